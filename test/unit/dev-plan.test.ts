import { describe, expect, it } from "vitest";
import { devPlan } from "../../cli/dev-plan.js";
import { InvalidArgumentError } from "../../common/errors.js";

describe("rexmesh dev: which hosts, where, whose, labelled how", () => {
  it("spreads generated hosts over regions, and over tenants one round of regions at a time", () => {
    const plan = devPlan({ hosts: 4, tenants: ["default", "acme"], labels: ["host-01=role=web", "host-01=env=dev=1", "host-04=role=db"] });
    expect(plan.regions).toEqual(["eu-west", "us-east"]);
    expect(plan.tenants).toEqual(["default", "acme"]);
    expect(plan.hosts).toEqual([
      { id: "host-01", region: "eu-west", tenant: "default", labels: { role: "web", env: "dev=1" } },
      { id: "host-02", region: "us-east", tenant: "default", labels: {} },
      { id: "host-03", region: "eu-west", tenant: "acme", labels: {} },
      { id: "host-04", region: "us-east", tenant: "acme", labels: { role: "db" } },
    ]);
  });

  it("takes hosts from an inventory: regions it names, tenants it names, labels merged with --label", () => {
    const plan = devPlan({
      inventory: { hosts: { "web-1": { region: "paris", labels: { role: "web" } }, "db-1": { tenant: "acme", labels: { role: "db", replicas: 2 } }, "cache-1": null } },
      labels: ["web-1=env=prod"],
    });
    expect(plan.regions).toEqual(["paris"]);
    expect(plan.tenants).toEqual(["default", "acme"]);
    expect(plan.hosts).toEqual([
      { id: "web-1", region: "paris", tenant: "default", labels: { role: "web", env: "prod" } },
      { id: "db-1", region: "paris", tenant: "acme", labels: { role: "db", replicas: "2" } },
      { id: "cache-1", region: "paris", tenant: "default", labels: {} },
    ]);
    // --regions adds the usual regions before those the inventory names; hosts without one go round them.
    expect(devPlan({ regions: 1, inventory: { hosts: { a: {}, b: { region: "paris" }, c: {} } } }).hosts.map((h) => h.region)).toEqual(["eu-west", "paris", "paris"]);
  });

  it.each([
    [{ labels: ["host-01=role"] }, /--label "host-01=role" is not HOST=KEY=VALUE/],
    [{ labels: ["host-09=role=web"] }, /no host host-09 in this mesh \(hosts are host-01 … host-06\)/],
    [{ tenants: ["a", "a"] }, /names a tenant twice/],
    [{ tenants: ["bad/tenant"] }, /tenant "bad\/tenant" is not valid/],
    [{ hosts: 2, inventory: { hosts: { a: {} } } }, /--hosts or --inventory, not both/],
    [{ inventory: { host: {} } }, /unknown key "host"/],
    [{ inventory: { hosts: {} } }, /inventory: no hosts/],
    [{ inventory: { hosts: { a: { region: "x", labels: "role=web" } } } }, /hosts\.a\.labels must be a map/],
    [{ inventory: { hosts: { a: { zone: "x" } } } }, /hosts\.a: unknown key "zone"/],
    [{ inventory: { hosts: { "a b": {} } } }, /host id "a b" is not valid/],
  ])("refuses %j in one line", (options, message) => {
    expect(() => devPlan(options)).toThrow(InvalidArgumentError);
    expect(() => devPlan(options)).toThrow(message);
  });
});
