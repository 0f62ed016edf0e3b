// Browser tests of the Chorus web app in real Chromium (playwright-core), against a real
// cluster that tests/web.rs starts: CHORUS_WEB_URLS is a comma-separated list of node
// base URLs (http://IP:PORT), CHORUS_WEB_SHOTS the directory for screenshots.
//
// Each check is a step; the script exits non-zero at the first failure, and fails on any
// JavaScript error or console error of any page.

import { chromium } from "playwright-core";
import { mkdirSync } from "node:fs";
import { join } from "node:path";

const urls = (process.env.CHORUS_WEB_URLS || "").split(",").filter(Boolean);
if (urls.length < 2) throw new Error("CHORUS_WEB_URLS needs at least two node URLs");
const shots = process.env.CHORUS_WEB_SHOTS || "screenshots";
mkdirSync(shots, { recursive: true });
const STEP_MS = 20_000;

const PHONE = { width: 390, height: 844 };
const DESKTOP = { width: 1280, height: 860 };

const problems = [];
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--autoplay-policy=no-user-gesture-required",
  ],
});

async function person(name, base, viewport) {
  const context = await browser.newContext({ viewport });
  const page = await context.newPage();
  page.on("pageerror", (error) => problems.push(`${name}: page error: ${error.message}`));
  page.on("console", (message) => {
    if (message.type() === "error") problems.push(`${name}: console error: ${message.text()}`);
  });
  page.setDefaultTimeout(STEP_MS);
  await page.goto(base + "/");
  return { name, page, base };
}

async function shoot(who, screen) {
  // Each screen at both widths.
  for (const [label, size] of [["phone", PHONE], ["desktop", DESKTOP]]) {
    await who.page.setViewportSize(size);
    await who.page.screenshot({ path: join(shots, `${screen}-${label}.png`), fullPage: true });
  }
}

async function signIn(who) {
  await who.page.getByLabel("Your name").fill(who.name);
  await who.page.getByRole("button", { name: "Sign in (development)" }).click();
  await who.page.locator("#conn[data-state=live]").waitFor();
  await who.page.locator("#rooms").waitFor({ state: "visible" });
}

async function comments(who) {
  return who.page.$$eval("#comments li", (items) =>
    items.map((li) => `${li.dataset.comment}|${li.querySelector(".author").textContent}|${li.querySelector(".text").textContent}`));
}

async function until(what, check) {
  const deadline = Date.now() + STEP_MS;
  for (;;) {
    if (await check()) return;
    if (Date.now() > deadline) throw new Error(`timed out: ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

async function say(who, text) {
  await who.page.getByLabel("Comment", { exact: true }).fill(text);
  await who.page.getByRole("button", { name: "Send" }).click();
  await until(`${who.name}'s comment ${text} shows`, async () =>
    (await comments(who)).some((c) => c.endsWith(`|${who.name}|${text}`)));
}

const steps = [];
function step(name, fn) {
  steps.push([name, fn]);
}

let alice, bob;

step("sign in on two nodes (alice on desktop, bob on a phone)", async () => {
  alice = await person("alice", urls[0], DESKTOP);
  bob = await person("bob", urls[1], PHONE);
  await shoot(alice, "signin");
  await signIn(alice);
  await signIn(bob);
});

step("alice creates a room; bob finds it in the list and joins", async () => {
  await alice.page.getByLabel("New room").fill("Browser room");
  await alice.page.getByRole("button", { name: "Create and join" }).click();
  await alice.page.locator("#room").waitFor({ state: "visible" });
  await until("bob's list shows the room", async () => {
    const before = await bob.page.locator("#room-list").getAttribute("data-loaded");
    await bob.page.getByRole("button", { name: "Refresh" }).click();
    // Wait for this refresh's answer before looking.
    await bob.page.waitForFunction(
      (b) => document.getElementById("room-list").dataset.loaded !== b, before);
    return (await bob.page.locator("#room-list li", { hasText: "Browser room" }).count()) > 0;
  });
  await shoot(bob, "rooms");
  await bob.page.getByRole("button", { name: "Join Browser room" }).click();
  await bob.page.locator("#room").waitFor({ state: "visible" });
  await until("alice sees two listening", async () =>
    (await alice.page.locator("#listeners").textContent()) === "2");
  await alice.page.getByText("People in the room").click();
  await alice.page.locator("#people-list li[data-person=bob]").waitFor();
  await alice.page.getByRole("button", { name: "Block bob" }).waitFor();
});

step("comments from both browsers arrive in the same order on both", async () => {
  await say(alice, "hello from alice");
  await say(bob, "hello from bob");
  for (let i = 1; i <= 3; i++) await say(i % 2 ? alice : bob, `round ${i}`);
  await until("five comments on both", async () =>
    (await comments(alice)).length === 5 && (await comments(bob)).length === 5);
  const a = await comments(alice);
  const b = await comments(bob);
  if (JSON.stringify(a) !== JSON.stringify(b)) throw new Error(`orders differ:\n${a}\n${b}`);
  const ids = a.map((c) => Number(c.split("|")[0]));
  if (ids.join() !== "1,2,3,4,5") throw new Error(`comment ids ${ids}`);
});

step("bob raises his hand; alice invites him to speak; he accepts", async () => {
  await bob.page.getByRole("button", { name: "Raise hand" }).click();
  const invite = alice.page.locator("#hands-list").getByRole("button", { name: "Invite bob to speak" });
  await invite.waitFor();
  await invite.click();
  await bob.page.locator("#invite-box").waitFor({ state: "visible" });
  await bob.page.getByRole("button", { name: "Accept" }).click();
  for (const who of [alice, bob]) {
    await who.page.locator("#stage-list li[data-user=bob]").waitFor();
  }
  await shoot(alice, "room");
});

step("bob talks with the fake microphone: alice decodes over 100 frames and sees him speak", async () => {
  await bob.page.getByRole("button", { name: "Start talking" }).click();
  await until("bob sends voice", async () => (await bob.page.evaluate(() => window.chorus.sent())) > 20);
  await until("alice decodes more than 100 frames of bob", async () =>
    (await alice.page.evaluate(() => window.chorus.decoded())) > 100);
  await alice.page.locator("#stage-list li.speaking[data-user=bob]").waitFor();
  await shoot(alice, "room-speaking");
  await bob.page.getByRole("button", { name: "Stop talking" }).click();
});

step("alice opens a poll; both vote; both see the tally, then the final result", async () => {
  await alice.page.getByLabel("New poll").fill("Tea or coffee?");
  await alice.page.getByLabel("Options, one per line").fill("tea\ncoffee");
  await alice.page.getByRole("button", { name: "Open poll" }).click();
  for (const who of [alice, bob]) await who.page.locator("#poll-list li[data-poll='1']").waitFor();
  await bob.page.getByRole("button", { name: "Vote coffee in poll 1" }).click();
  await alice.page.getByRole("button", { name: "Vote coffee in poll 1" }).click();
  const tally = (who) => who.page.locator("#poll-list li[data-poll='1'] [data-tally='1']").textContent();
  await until("both see two votes for coffee", async () => (await tally(alice)) === "2" && (await tally(bob)) === "2");
  await alice.page.getByRole("button", { name: "Close poll 1" }).click();
  await until("both see the poll closed", async () =>
    (await bob.page.locator("#poll-list li[data-poll='1']").getAttribute("data-state")) === "closed");
  await shoot(bob, "room-poll");
});

step("bob's connection is cut: the page reconnects and misses no comment", async () => {
  await bob.page.evaluate(() => window.chorus.drop());
  // While bob is away (or reconnecting), alice talks.
  for (let i = 1; i <= 3; i++) await say(alice, `while you were away ${i}`);
  await bob.page.locator("#conn[data-state=live]").waitFor();
  await until("bob has all eight", async () => (await comments(bob)).length === 8);
  const a = await comments(alice);
  const b = await comments(bob);
  if (JSON.stringify(a) !== JSON.stringify(b)) throw new Error(`after the cut:\n${a}\n${b}`);
});

const ADMIN = { authorization: "Bearer chorus-dev-admin" };
async function admin(method, path, body) {
  const response = await fetch(urls[0] + path, {
    method,
    headers: { ...ADMIN, ...(body ? { "content-type": "application/json" } : {}) },
    body: body ? JSON.stringify(body) : undefined,
  });
  const text = await response.text();
  if (!response.ok) throw new Error(`${method} ${path}: ${response.status} ${text}`);
  return text;
}

step("a quiz question is answered; the verdict opens at the announcement; the payout shows", async () => {
  const room = await alice.page.evaluate(() => window.chorus.room());
  const quiz = JSON.parse(await admin("POST", "/admin/quiz", {
    room,
    prize_cents: 10000,
    window_ms: 4000,
    questions: [{ text: "Which is a river?", options: ["Yangtze", "Everest"], correct: 0 }],
  })).quiz_id;
  await admin("POST", `/admin/quiz/push?id=${quiz}`);
  await bob.page.locator("#quiz").waitFor({ state: "visible" });
  await bob.page.getByRole("button", { name: "Answer Yangtze" }).click();
  await until("bob's answer is sealed", async () =>
    (await bob.page.locator("#quiz-status").textContent()).includes("sealed"));
  await shoot(bob, "quiz-sealed");
  // The answer can be announced once the question's window has closed.
  await until("the announcement is accepted", async () => {
    try {
      await admin("POST", `/admin/quiz/announce?id=${quiz}`);
      return true;
    } catch (error) {
      if (!String(error.message).includes(" 409 ")) throw error;
      return false;
    }
  });
  await until("bob's verdict opens: correct", async () =>
    (await bob.page.locator("#quiz-status").getAttribute("data-verdict")) === "correct");
  await admin("POST", `/admin/quiz/finish?id=${quiz}`);
  await until("bob sees that he won", async () =>
    (await bob.page.locator("#quiz-status").getAttribute("data-verdict")) === "winner");
  await shoot(bob, "quiz-finished");
});

step("a rain is tapped; the amount shown is bob's in the server's ledger", async () => {
  const room = await alice.page.evaluate(() => window.chorus.room());
  const rain = JSON.parse(await admin("POST", `/admin/rain?room=${room}&total=5000&count=20&duration_ms=4000`)).rain_id;
  await bob.page.locator("#rain").waitFor({ state: "visible" });
  const tap = bob.page.getByRole("button", { name: "Tap!" });
  const deadline = Date.now() + 4000;
  while (Date.now() < deadline && !(await tap.isDisabled())) {
    await tap.click();
    await bob.page.waitForTimeout(120);
  }
  await until("the rain is over on bob's page", async () =>
    (await bob.page.locator("#rain-info").textContent()).includes("over"));
  await shoot(bob, "rain");
  const shown = Number(await bob.page.locator("#rain-won").getAttribute("data-cents"));
  let ledger = 0;
  for (const line of (await admin("GET", `/admin/rain/ledger?id=${rain}`)).split("\n").filter(Boolean)) {
    const entry = JSON.parse(line);
    if (entry.kind === "grant" && entry.user === "bob") ledger += entry.amount;
  }
  if (shown !== ledger) throw new Error(`bob's page shows ${shown} cents, the ledger ${ledger}`);
  if (ledger === 0) throw new Error("bob got nothing: the test did not tap");
});

step("voice message: recorded in one browser, played in another while it uploads, read on both of bob's", async () => {
  const bob2 = await person("bob", urls[2], PHONE);
  await signIn(bob2);
  for (const who of [alice, bob]) {
    await who.page.getByRole("button", { name: "Leave" }).click();
    await who.page.locator("#rooms").waitFor({ state: "visible" });
  }
  for (const who of [alice, bob, bob2]) {
    await who.page.getByRole("button", { name: "Voice messages" }).click();
    await who.page.locator("#messages").waitFor({ state: "visible" });
  }
  await alice.page.getByLabel("To", { exact: true }).fill("bob");
  await alice.page.getByRole("button", { name: "Record" }).click();
  // bob sees it arrive while alice is still recording, and plays it at once.
  const item = bob.page.locator("#vm-list li[data-message]").first();
  await item.waitFor();
  if ((await item.getAttribute("data-upload")) !== "uploading") throw new Error("the message arrived already complete");
  await item.getByRole("button", { name: /^Play/ }).click();
  await alice.page.waitForTimeout(3000);
  await shoot(alice, "messages-recording");
  await alice.page.getByRole("button", { name: "Stop and send" }).click();
  await until("alice's message is complete", async () =>
    (await alice.page.locator("#vm-progress").textContent()).includes("complete"));
  await until("bob's page decodes more than 100 frames of it", async () =>
    (await bob.page.evaluate(() => window.chorus.vmDecoded())) > 100);
  await until("read on bob's first browser", async () =>
    (await bob.page.locator("#vm-list li[data-message]").first().getAttribute("data-read")) === "true");
  await until("and on his second, on another node", async () =>
    (await bob2.page.locator("#vm-list li[data-message]").first().getAttribute("data-read")) === "true");
  await shoot(bob2, "messages");
});

step("the operator page lists three members with the leader and their load", async () => {
  const op = await person("operator", urls[2], DESKTOP);
  await op.page.getByLabel("Operator: admin token").fill("chorus-dev-admin");
  await op.page.getByRole("button", { name: "Open the operator page" }).click();
  await op.page.locator("#operator").waitFor({ state: "visible" });
  await until("three members, all up", async () =>
    (await op.page.locator("#members tbody tr[data-state=up]").count()) === 3);
  const leader = await op.page.locator("#op-leader").textContent();
  if (!/^\d+$/.test(leader)) throw new Error(`leader ${leader}`);
  await until("loads from every member", async () =>
    (await op.page.$$eval("#members tbody tr td:nth-child(5)", (tds) => tds.every((td) => td.textContent !== "?"))));
  await op.page.waitForTimeout(2500); // a second point on the charts
  await shoot(op, "operator");
});

let failed = false;
for (const [name, fn] of steps) {
  try {
    await fn();
    if (problems.length) throw new Error(problems.join("\n"));
    console.log(`PASS ${name}`);
  } catch (error) {
    console.log(`FAIL ${name}: ${error.stack || error}`);
    failed = true;
    break;
  }
}
await browser.close();
if (problems.length) {
  console.log(`FAIL JavaScript errors:\n${problems.join("\n")}`);
  failed = true;
}
process.exit(failed ? 1 : 0);
