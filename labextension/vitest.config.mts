import { defineConfig } from 'vitest/config';

// Unit tests of the pure front-end logic (no JupyterLab, no DOM).
export default defineConfig({
  test: {
    include: ['test/**/*.spec.ts'],
    environment: 'node'
  }
});
