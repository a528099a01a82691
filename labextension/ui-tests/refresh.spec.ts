import { expect, test } from '@playwright/test';

/**
 * Outputs survive the browser: a refresh in the middle of a printing cell on a remote
 * kernel loses no line, and the running cell keeps streaming into its cell (issue 18).
 * tests/ui/test_lab_ui.py::test_outputs_survive_a_refresh starts a real JupyterLab,
 * broker and host and passes REFRESH_LAB_URL and REFRESH_LAB_TOKEN; the notebook
 * printer.ipynb (one cell printing 0..39, a line every 0.25 s) is in the lab's root.
 */
const LAB_URL = process.env.REFRESH_LAB_URL ?? '';
const LAB_TOKEN = process.env.REFRESH_LAB_TOKEN ?? '';
const LINES = 40;

test('a refresh during a printing cell loses no line', async ({ page }) => {
  test.skip(
    !LAB_URL,
    'REFRESH_LAB_URL is not set: run through tests/ui/test_lab_ui.py'
  );

  await page.goto(`${LAB_URL}/lab/tree/printer.ipynb?reset&token=${LAB_TOKEN}`);
  await expect(page.locator('#jupyterlab-splash')).toHaveCount(0, {
    timeout: 60_000
  });
  const meter = page.getByRole('button', { name: 'Shared GPU meter' });
  await expect(meter).toHaveAttribute('data-state', 'running', {
    timeout: 90_000
  });

  // Run the cell, and leave while it prints.
  const cell = page.locator('.jp-Notebook .jp-CodeCell').first();
  await cell.locator('.jp-InputArea-editor').click();
  await page.keyboard.press('Shift+Enter');
  const output = () =>
    page.locator('.jp-Notebook .jp-CodeCell').first().locator('.jp-OutputArea');
  await expect(output()).toContainText('line 3', { timeout: 60_000 });
  await page.reload();
  await expect(page.locator('#jupyterlab-splash')).toHaveCount(0, {
    timeout: 60_000
  });

  // Back: what it printed meanwhile is there, and the rest streams in.
  await expect(output()).toContainText('line 5', { timeout: 60_000 });
  await expect(output()).toContainText(`line ${LINES - 1}`, {
    timeout: 90_000
  });
  await expect(output()).toContainText('done', { timeout: 30_000 });
  const text = await output().innerText();
  for (let i = 0; i < LINES; i++) {
    // every line once: none lost, none twice
    expect(text.split(`line ${i}\n`).length - 1, `line ${i}`).toBe(1);
  }
  await expect(
    page.locator('.jp-Notebook .jp-CodeCell').first().locator('.jp-InputPrompt')
  ).toHaveText(/\[\d+\]/, { timeout: 30_000 });
});
