import { expect, test } from '@playwright/test';

/**
 * The "culled when idle" banner, against a real JupyterLab that culls kernels idle for a few
 * seconds even while connected (tests/ui/test_lab_ui.py::test_culled_banner starts it with
 * a real broker and host and passes CULL_LAB_URL, CULL_LAB_TOKEN and CULL_HOST).
 */
const LAB_URL = process.env.CULL_LAB_URL ?? '';
const LAB_TOKEN = process.env.CULL_LAB_TOKEN ?? '';
const HOST = process.env.CULL_HOST ?? 'host-idle';

test('an idle remote kernel is culled: the notebook says so and restarts it', async ({
  page
}) => {
  test.skip(
    !LAB_URL,
    'CULL_LAB_URL is not set: run through tests/ui/test_lab_ui.py'
  );

  await page.goto(`${LAB_URL}/lab?reset&token=${LAB_TOKEN}`);
  await expect(page.locator('#jupyterlab-splash')).toHaveCount(0, {
    timeout: 60_000
  });

  // A new notebook from the shared-GPU launcher card starts on the host.
  await page
    .locator('.jp-Launcher')
    .getByText('Shared GPU · from 3.60 cr/h')
    .click();
  const meter = page.getByRole('button', { name: 'Shared GPU meter' });
  await expect(meter).toHaveAttribute('data-state', 'running', {
    timeout: 90_000
  });
  await expect(meter).toContainText(HOST);

  // Left idle, the server culls it; the banner says the bill is final.
  const banner = page.getByRole('status', { name: 'Remote kernel notice' });
  await expect(banner).toContainText(
    'This kernel was stopped after being idle; its bill is final',
    { timeout: 60_000 }
  );
  await expect(banner).toContainText(/Billed \d+ s: \d+\.\d{2,} credits/);

  // "Restart kernel" starts a new remote kernel for the notebook.
  const started = page.waitForResponse(
    r =>
      /\/api\/(sessions|kernels)/.test(r.url()) &&
      ['POST', 'PATCH'].includes(r.request().method())
  );
  await banner.getByRole('button', { name: 'Restart kernel' }).click();
  expect((await started).ok()).toBe(true);
  await expect(meter).toHaveAttribute('data-state', /starting|running/, {
    timeout: 90_000
  });
});
