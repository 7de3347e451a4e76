// Minimal SVG bar charts for the benchmark summary (no dependencies).
const esc = (s) => String(s).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");

/**
 * A horizontal bar chart. spec = { title, unit, bars: [{ label, value, ref? }] }.
 * Bars with ref: true (targets, baselines) are drawn grey.
 */
export function barChart(spec) {
  const bars = spec.bars.filter((b) => Number.isFinite(b.value));
  const width = 640;
  const labelW = 190;
  const barH = 22;
  const gap = 8;
  const top = 34;
  const height = top + bars.length * (barH + gap) + 10;
  const max = Math.max(1e-9, ...bars.map((b) => b.value));
  const scale = (width - labelW - 110) / max;
  const rows = bars.map((b, i) => {
    const y = top + i * (barH + gap);
    const w = Math.max(1, b.value * scale);
    const fill = b.ref ? "#b0b0b0" : "#3b6ea8";
    const text = `${Number(b.value.toPrecision(4)).toLocaleString("en-US")} ${spec.unit ?? ""}`.trim();
    return [
      `<text x="${labelW - 8}" y="${y + barH * 0.7}" text-anchor="end" font-size="12">${esc(b.label)}</text>`,
      `<rect x="${labelW}" y="${y}" width="${w.toFixed(1)}" height="${barH}" fill="${fill}"/>`,
      `<text x="${labelW + w + 6}" y="${y + barH * 0.7}" font-size="12">${esc(text)}</text>`,
    ].join("");
  });
  return [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}" font-family="sans-serif">`,
    `<rect width="100%" height="100%" fill="white"/>`,
    `<text x="10" y="20" font-size="14" font-weight="bold">${esc(spec.title)}</text>`,
    ...rows,
    `</svg>`,
    ``,
  ].join("\n");
}
