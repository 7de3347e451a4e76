/**
 * The mesh every chaos run uses: region alpha with two proxies (so hosts
 * fail over between them) and two daemon processes of two hosts each, region
 * beta with one proxy and one daemon process of two hosts. The names are the
 * ones LocalMesh gives; the runner checks that they match.
 */
export const TOPOLOGY = {
  regions: ["alpha", "beta"],
  proxiesPerRegion: { alpha: 2, beta: 1 } as Record<string, number>,
  hostsPerProcess: 2,
  proxies: [
    { name: "proxy-alpha-1", region: "alpha" },
    { name: "proxy-alpha-2", region: "alpha" },
    { name: "proxy-beta", region: "beta" },
  ],
  daemons: [
    { name: "daemon-alpha-1", region: "alpha", hosts: ["a1", "a2"], proxies: ["proxy-alpha-1", "proxy-alpha-2"] },
    { name: "daemon-alpha-2", region: "alpha", hosts: ["a3", "a4"], proxies: ["proxy-alpha-2", "proxy-alpha-1"] },
    { name: "daemon-beta-3", region: "beta", hosts: ["b1", "b2"], proxies: ["proxy-beta"] },
  ],
} as const;

export const ALL_HOSTS: readonly string[] = TOPOLOGY.daemons.flatMap((d) => d.hosts);

/** A relayed connection, `<dialler>-><server>`: every proxy to the controller, every daemon to each proxy it was given. */
export const LINKS: readonly string[] = [
  ...TOPOLOGY.proxies.map((p) => `${p.name}->controller`),
  ...TOPOLOGY.daemons.flatMap((d) => d.proxies.map((p) => `${d.name}->${p}`)),
];

export function linkName(from: string, to: string): string {
  return `${from}->${to}`;
}

/** The hosts whose work passes through a role or a link. */
export function hostsBehind(target: string): string[] {
  const from = target.split("->")[0]!;
  if (from === "controller") return [...ALL_HOSTS];
  const daemon = TOPOLOGY.daemons.find((d) => d.name === from);
  if (daemon) return [...daemon.hosts];
  const proxy = TOPOLOGY.proxies.find((p) => p.name === from);
  if (proxy) return TOPOLOGY.daemons.filter((d) => d.region === proxy.region).flatMap((d) => d.hosts);
  throw new Error(`unknown chaos target ${target}`);
}
