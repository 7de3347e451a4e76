// Lint for what the type checker does not catch: promises nobody awaits or
// handles (a storage error on such a path is an unhandled rejection, which
// ends the process), and promises passed where a callback's result is
// ignored. Type-aware (typescript-eslint's project service reads tsconfig.json).
import tseslint from "typescript-eslint";

export default tseslint.config(
  { ignores: [".tmp/**", "dist/**", "gen/**", "node_modules/**", "bench/**", "examples/**", "**/*.js", "**/*.mjs", "console/vite.config.ts"] },
  {
    files: ["**/*.ts", "**/*.tsx"],
    languageOptions: {
      parser: tseslint.parser,
      parserOptions: { projectService: true, tsconfigRootDir: import.meta.dirname },
    },
    plugins: { "@typescript-eslint": tseslint.plugin },
    // Some files note why they use `any` for a rule this config does not run.
    linterOptions: { reportUnusedDisableDirectives: "off" },
    rules: {
      "@typescript-eslint/no-floating-promises": ["error", { ignoreVoid: false }],
      "@typescript-eslint/no-misused-promises": "error",
    },
  },
);
