// Drives the federation's web view in a real headless Chromium (Debian's
// /usr/bin/chromium, through playwright-core; no browser is downloaded).
// Usage: node ui.mjs URL SCREENSHOT
// Prints LOADED once the page shows the sites and the service, then waits
// for the test to stop a site's gateway (the test writes STOPPED <site> on
// stdin) and for the page to show that site unhealthy and its traffic
// moved, without a reload; prints UPDATED and exits 0. Any console error
// or page error fails it (exit 1, saying which).
import { chromium } from "playwright-core";
import { createInterface } from "node:readline";

const [url, screenshot] = process.argv.slice(2);
const fail = (why) => { console.log(`FAIL ${why}`); process.exit(1); };
const errors = [];
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  // playwright starts it with a fresh, empty profile directory of its own.
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  page.on("console", (m) => { if (m.type() === "error") errors.push(`console: ${m.text()}`); });
  page.on("pageerror", (e) => errors.push(`page error: ${e.message}`));
  await page.goto(url);
  const text = async (sel) => (await page.locator(sel).first().textContent({ timeout: 30000 })) ?? "";
  // The three sites and the service.
  for (const site of ["east", "west", "central"]) {
    await page.waitForSelector(`[data-site="${site}"][data-state="available"]`, { timeout: 30000 });
  }
  await page.waitForSelector(`[data-service="shop/echo"]`, { timeout: 30000 });
  await page.waitForFunction(() => {
    const t = document.querySelector('[data-traffic="shop/echo@central"]');
    return t && t.textContent.startsWith("east");
  }, null, { timeout: 30000 });
  console.log(`LOADED traffic from central: ${await text('[data-traffic="shop/echo@central"]')}`);
  if (errors.length) fail(errors.join("; "));

  const rl = createInterface({ input: process.stdin });
  const stopped = await new Promise((resolve) => rl.on("line", (l) => {
    if (l.startsWith("STOPPED ")) resolve(l.slice(8).trim());
  }));
  // No reload: the page updates itself.
  await page.waitForSelector(`[data-site="${stopped}"][data-state="unavailable"]`, { timeout: 60000 });
  await page.waitForFunction((site) => {
    const t = document.querySelector('[data-traffic="shop/echo@central"]');
    return t && !t.textContent.includes(site) && t.textContent.startsWith("west");
  }, stopped, { timeout: 60000 });
  if (screenshot) await page.screenshot({ path: screenshot, fullPage: true });
  if (errors.length) fail(errors.join("; "));
  console.log(`UPDATED ${stopped} unavailable; traffic from central: ${await text('[data-traffic="shop/echo@central"]')}`);
  rl.close();
} catch (e) {
  fail(e.message.split("\n")[0]);
} finally {
  await browser.close();
}
