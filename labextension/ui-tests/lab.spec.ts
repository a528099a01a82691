import { Page, expect, test } from '@playwright/test';

/**
 * One walk through what a notebook user does, against a real JupyterLab, broker and two
 * host agents (tests/ui/test_lab_ui.py starts them and passes their details here):
 * CHEAP_HOST (3.60 cr/h, process CHEAP_HOST_PID) and DEAR_HOST (36.00 cr/h).
 */
const LAB_URL = process.env.LAB_URL ?? '';
const LAB_TOKEN = process.env.LAB_TOKEN ?? '';
const CHEAP = process.env.CHEAP_HOST ?? 'host-cheap';
const DEAR = process.env.DEAR_HOST ?? 'host-dear';
const CHEAP_PID = Number(process.env.CHEAP_HOST_PID ?? '0');
const SCREENSHOT = process.env.SCREENSHOT ?? '';
/** "Use this GPU", or "Use this host" for a CPU offer (hosts without a GPU). */
const USE = /^Use this (GPU|host)$/;

function offer(page: Page, host: string) {
  return page
    .getByRole('list', { name: 'GPU offers' })
    .getByRole('listitem', { name: new RegExp(`on ${host}$`) });
}

async function costMicro(page: Page): Promise<number> {
  const value = await page
    .getByRole('button', { name: 'Shared GPU meter' })
    .getAttribute('data-cost-micro');
  return Number(value);
}

test('rent a GPU from the marketplace, watch the meter, stop, get the bill, lose the host', async ({
  page
}) => {
  test.skip(
    !LAB_URL,
    'LAB_URL is not set: run through tests/ui/test_lab_ui.py'
  );

  await page.goto(`${LAB_URL}/lab?reset&token=${LAB_TOKEN}`);
  await expect(page.locator('#jupyterlab-splash')).toHaveCount(0, {
    timeout: 60_000
  });

  // The marketplace panel shows both hosts' offers, with prices per hour.
  await page.getByRole('tab', { name: 'Shared GPUs' }).click();
  await expect(offer(page, CHEAP)).toContainText('3.60 cr/h');
  await expect(offer(page, DEAR)).toContainText('36.00 cr/h');
  await expect(offer(page, CHEAP)).toContainText('free');
  // Each card tells the host's record and, once its self-test reported, its measured speed.
  await expect(offer(page, CHEAP)).toContainText(/new host|\d+ % reliable/);
  await expect(offer(page, CHEAP)).toContainText(
    /\d[\d.]* [TG]FLOPS fp(16|32)/
  );

  // The launcher's shared-GPU card shows the cheapest free price.
  await expect(
    page.locator('.jp-Launcher').getByText('Shared GPU · from 3.60 cr/h')
  ).toBeVisible();

  // Sorting by price per speed keeps every offer; the fast cheap host comes first.
  const sortBy = page.getByLabel('Sort by');
  await sortBy.selectOption('value');
  await expect(page.getByText('2 of 2 offers')).toBeVisible();
  await expect(
    page.getByRole('list', { name: 'GPU offers' }).getByRole('listitem').first()
  ).toHaveAttribute('data-host-id', CHEAP);
  await sortBy.selectOption('price');

  // A filter hides the offer that does not match, and clearing it brings it back.
  const maxPrice = page.getByLabel('Max price (credits/h)');
  await maxPrice.fill('10');
  await expect(offer(page, DEAR)).toHaveCount(0);
  await expect(offer(page, CHEAP)).toHaveCount(1);
  await expect(page.getByText('1 of 2 offers')).toBeVisible();
  await maxPrice.fill('');
  await expect(offer(page, DEAR)).toHaveCount(1);

  // "Use this GPU" with no notebook open starts a new notebook on that offer.
  const chosen = page.waitForResponse(
    r =>
      r.url().includes('/gpu-share/user/preference') &&
      r.request().method() === 'POST'
  );
  await offer(page, CHEAP).getByRole('button', { name: USE }).click();
  expect((await chosen).status()).toBe(200);
  const progress = page.getByRole('status', { name: 'Remote kernel start-up' });
  await expect(progress).toContainText(
    new RegExp(
      `Finding a host|Starting the kernel on ${CHEAP}|Kernel ready on ${CHEAP}`
    )
  );

  // Run a cell: it runs on the host.
  const meter = page.getByRole('button', { name: 'Shared GPU meter' });
  await expect(meter).toHaveAttribute('data-state', 'running', {
    timeout: 90_000
  });
  await expect(meter).toContainText(CHEAP);
  const editor = page.locator('.jp-NotebookPanel .jp-Cell .cm-content').first();
  await editor.click();
  await page.keyboard.type(
    "import os; print('on', os.environ['GPU_SHARE_HOST_ID'])"
  );
  await page.keyboard.press('Shift+Enter');
  await expect(
    page.locator('.jp-NotebookPanel .jp-OutputArea-output').first()
  ).toContainText(`on ${CHEAP}`, { timeout: 60_000 });

  // The cost in the status bar rises every second.
  const before = await costMicro(page);
  await page.waitForTimeout(2500);
  const after = await costMicro(page);
  expect(after).toBeGreaterThan(before);
  await expect(meter).toContainText(
    /\d+:\d\d · \d+\.\d{4} cr · [\d,]+\.\d{2,} left/
  );
  // What the host reports about the rented hardware: GPU use and memory, or CPU load.
  await expect(meter).toContainText(/ · (GPU \d+ %|GPU [\d.]+\/|CPU load \d)/);
  if (SCREENSHOT) {
    await page.screenshot({ path: SCREENSHOT });
  }

  // Details, then Stop, then the bill.
  await meter.click();
  const details = page.getByRole('dialog');
  await expect(details).toContainText('Cost so far');
  await expect(details).toContainText(CHEAP);
  await details.getByRole('button', { name: 'Stop' }).click();
  const bill = page.getByRole('dialog').filter({ hasText: 'Bill' });
  await expect(bill).toContainText(/Bill\s*\d+\.\d{2,} credits/, {
    timeout: 30_000
  });
  // Shutting the kernel down ends it cleanly first ("the kernel exited"), or the stop does.
  await expect(bill).toContainText(/ended: (stopped|the kernel exited)/);
  await bill.getByRole('button', { name: 'Close' }).click();
  await expect(meter).toContainText('ended · bill');

  // Start again on the same notebook, then pull the host's plug: a banner says so.
  await offer(page, CHEAP).getByRole('button', { name: USE }).click();
  await expect(meter).toHaveAttribute('data-state', 'running', {
    timeout: 90_000
  });
  await expect(meter).toContainText(CHEAP);
  expect(CHEAP_PID).toBeGreaterThan(0);
  process.kill(CHEAP_PID, 'SIGKILL');
  const banner = page.getByRole('status', { name: 'Remote kernel notice' });
  await expect(banner).toContainText(`Host ${CHEAP} was lost`, {
    timeout: 60_000
  });
  await expect(
    banner.getByRole('button', { name: 'Restart on another GPU' })
  ).toBeVisible();
  // The cheap offer disappears from the marketplace within 5 s of the host going.
  await expect(offer(page, CHEAP)).toHaveCount(0, { timeout: 15_000 });
});
