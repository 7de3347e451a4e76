import { fileURLToPath } from "node:url";
import { defineConfig } from "vite";

// The console is built into dist/console with the rest of the repository
// (npm run build); the controller serves those files as they are. Preact's
// JSX runtime through esbuild: no framework plugin needed.
export default defineConfig({
  root: fileURLToPath(new URL(".", import.meta.url)),
  base: "/",
  logLevel: "warn",
  esbuild: { jsx: "automatic", jsxImportSource: "preact" },
  build: {
    outDir: fileURLToPath(new URL("../dist/console", import.meta.url)),
    emptyOutDir: true,
    // One small bundle; no inline scripts or data URLs (the console's CSP allows only its own files).
    assetsInlineLimit: 0,
    modulePreload: { polyfill: false },
    chunkSizeWarningLimit: 1024,
  },
});
