import { Page, expect, test } from '@playwright/test';

/**
 * Classes, against real JupyterLabs, a broker and a host agent started by
 * tests/ui/test_class_ui.py: class ml101 (quota 1 h per student) with a published
 * week1.ipynb; the student ann's lab (STUDENT_LAB_URL), the teacher prof's lab
 * (TEACHER_LAB_URL); ben, another student, already runs a class kernel.
 */
const STUDENT_URL = process.env.STUDENT_LAB_URL ?? '';
const STUDENT_TOKEN = process.env.STUDENT_LAB_TOKEN ?? '';
const TEACHER_URL = process.env.TEACHER_LAB_URL ?? '';
const TEACHER_TOKEN = process.env.TEACHER_LAB_TOKEN ?? '';
const HOST = process.env.CLASS_HOST ?? 'class-gpu';
const SCREENSHOT = process.env.SCREENSHOT ?? '';

async function openLab(page: Page, url: string, token: string): Promise<void> {
  await page.goto(`${url}/lab?reset&token=${token}`);
  await expect(page.locator('#jupyterlab-splash')).toHaveCount(0, {
    timeout: 60_000
  });
  await page.getByRole('tab', { name: 'Classes' }).click();
}

function classCard(page: Page, name: string) {
  return page
    .getByRole('list', { name: 'Your classes' })
    .getByRole('listitem', {
      name: `Class ${name}`
    });
}

test.describe.serial('classes', () => {
  test('a student sees the class and its quota, fetches a notebook and runs it on the class GPU', async ({
    page
  }) => {
    test.skip(
      !STUDENT_URL,
      'STUDENT_LAB_URL is not set: run through tests/ui/test_class_ui.py'
    );
    await openLab(page, STUDENT_URL, STUDENT_TOKEN);

    const card = classCard(page, 'ml101');
    await expect(card).toContainText('student');
    await expect(card).toContainText('taught by prof');
    await expect(card.getByLabel('Quota left in ml101')).toHaveText(
      '1 h 00 min'
    );

    // Fetch: the notebook lands in ml101/ and opens on the class kernel.
    const notebook = card
      .getByRole('list', { name: 'Notebooks of ml101' })
      .getByRole('listitem', { name: 'week1.ipynb' });
    await notebook.getByRole('button', { name: 'Fetch' }).click();
    await expect(page.getByRole('tab', { name: /week1\.ipynb/ })).toBeVisible({
      timeout: 30_000
    });

    // Its kernel runs on the class pool; the meter says who pays and the quota left.
    const meter = page.getByRole('button', { name: 'Shared GPU meter' });
    await expect(meter).toHaveAttribute('data-state', 'running', {
      timeout: 90_000
    });
    await expect(meter).toHaveAttribute('data-class', 'ml101');
    await expect(meter).toContainText(HOST);
    await expect(meter).toContainText(
      /charged to ml101 · \d+ (min|h) \d+ (s|min) left/,
      {
        timeout: 15_000
      }
    );
    await page
      .locator('.jp-NotebookPanel .jp-Cell .cm-content')
      .first()
      .click();
    await page.keyboard.press('Shift+Enter');
    await expect(
      page.locator('.jp-NotebookPanel .jp-OutputArea-output').first()
    ).toContainText(`on ${HOST}`, { timeout: 60_000 });

    // The file browser shows the fetched folder.
    await page.getByRole('tab', { name: 'File Browser' }).click();
    await expect(
      page.locator('.jp-DirListing-content .jp-DirListing-itemText', {
        hasText: 'ml101'
      })
    ).toBeVisible({ timeout: 20_000 });
  });

  test('the teacher dashboard shows running student kernels and stops one', async ({
    page
  }) => {
    test.skip(
      !TEACHER_URL,
      'TEACHER_LAB_URL is not set: run through tests/ui/test_class_ui.py'
    );
    await openLab(page, TEACHER_URL, TEACHER_TOKEN);

    // A wider sidebar for the dashboard's table.
    const handle = page
      .locator('#jp-main-split-panel > .lm-SplitPanel-handle')
      .first();
    const box = await handle.boundingBox();
    if (box) {
      await page.mouse.move(box.x + box.width / 2, box.y + box.height / 2);
      await page.mouse.down();
      await page.mouse.move(box.x + 260, box.y + box.height / 2, { steps: 5 });
      await page.mouse.up();
    }

    const card = classCard(page, 'ml101');
    await expect(card).toContainText('teacher');
    await expect(card.getByLabel('Budget left in ml101')).toContainText(
      'credits'
    );
    const students = card.getByRole('table', { name: 'Students of ml101' });
    const ann = students.getByRole('row', { name: 'Student ann' });
    const ben = students.getByRole('row', { name: 'Student ben' });
    const cat = students.getByRole('row', { name: 'Student cat' });
    await expect(ann).toHaveAttribute('data-running', 'yes');
    await expect(ben).toHaveAttribute('data-running', 'yes');
    await expect(cat).toHaveAttribute('data-running', 'no');
    await expect(cat.getByRole('button', { name: 'Stop cat' })).toHaveCount(0);
    await expect(card).toContainText('3 · 2 running');

    // The chart fills in from the 2 s polls.
    const chart = card.getByRole('img', { name: /Class use over time/ });
    await expect(chart.locator('path')).toHaveAttribute(
      'd',
      /M[\d.]+ [\d.]+ L/,
      {
        timeout: 15_000
      }
    );
    await page.waitForTimeout(4000);
    if (SCREENSHOT) {
      await page.screenshot({ path: SCREENSHOT });
    }

    await ann.getByRole('button', { name: 'Stop ann' }).click();
    const dialog = page.getByRole('dialog');
    await expect(dialog).toContainText("Stop ann's kernel?");
    await dialog.getByRole('button', { name: 'Stop kernel' }).click();
    await expect(card.getByRole('status')).toContainText(
      "Stopped ann's kernel."
    );
    await expect(ann).toHaveAttribute('data-running', 'no', {
      timeout: 15_000
    });
    await expect(ann.getByRole('button', { name: 'Stop ann' })).toHaveCount(0);
    await expect(ben).toHaveAttribute('data-running', 'yes');
  });
});
