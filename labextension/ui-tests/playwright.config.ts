import { defineConfig } from '@playwright/test';

/**
 * UI tests against a running JupyterLab whose URL (with its token) is in LAB_URL; started
 * by tests/ui/test_lab_ui.py with a real broker and host agents. The browser is the system
 * Chromium (CHROMIUM, default /usr/bin/chromium): nothing is downloaded.
 */
export default defineConfig({
  testDir: '.',
  testMatch: '*.spec.ts',
  timeout: 240_000,
  expect: { timeout: 30_000 },
  workers: 1,
  retries: 0,
  reporter: [['list']],
  outputDir: 'test-results',
  use: {
    headless: true,
    viewport: { width: 1400, height: 860 },
    trace: 'retain-on-failure',
    screenshot: 'only-on-failure',
    launchOptions: {
      executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
      args: [
        '--headless',
        '--no-sandbox',
        '--disable-gpu',
        '--disable-background-networking',
        '--disable-component-update',
        '--disable-sync',
        '--no-first-run'
      ]
    }
  }
});
