// Drives headless Chromium (playwright-core) through quicpush's browser test: the
// example page (examples/browser) running goim-client.js connect over WebSocket, and pushes made through the HTTP
// API (and a kick through the backend RPC) must arrive as goim's client sees them.
// Started by tests/browser/run, which passes everything in the environment.
"use strict";
const fs = require("fs");
const http = require("http");
const path = require("path");
const { execFileSync } = require("child_process");
const { chromium } = require(process.env.PLAYWRIGHT);

const WS_URL = process.env.WS_URL;
const API = process.env.HTTP_API;
const TOKEN = process.env.API_TOKEN;
const KICK = process.env.QUICPUSH_KICK;
const PAGE_PORT = Number(process.env.PAGE_PORT);
// The example page and its client, as a user would open them.
const pages = path.join(__dirname, "..", "..", "examples", "browser");

function fail(message) {
  console.error(`FAIL: ${message}`);
  process.exit(1);
}

// Serves index.html and goim-client.js: the page's origin is http://127.0.0.1:<port>.
function pageServer(port) {
  const files = { "/index.html": "text/html", "/goim-client.js": "text/javascript" };
  const server = http.createServer((req, res) => {
    const url = new URL(req.url, "http://x");
    const type = files[url.pathname];
    if (!type) {
      res.writeHead(404).end();
      return;
    }
    res.writeHead(200, { "content-type": type });
    res.end(fs.readFileSync(path.join(pages, url.pathname)));
  });
  return new Promise((resolve) => server.listen(port, "127.0.0.1", () => resolve(server)));
}

async function push(route, query, body) {
  const res = await fetch(`${API}${route}?${query}`, {
    method: "POST",
    headers: { authorization: `Bearer ${TOKEN}`, "content-type": "application/json" },
    body,
  });
  const reply = await res.json();
  if (res.status !== 200 || reply.code !== 0) {
    fail(`${route}?${query}: HTTP ${res.status} ${JSON.stringify(reply)}`);
  }
  return reply;
}

async function events(page) {
  return page.evaluate(() => window.events);
}

// Polls the page's events until `test` holds, at most `ms`.
async function until(page, what, test, ms = 10000) {
  const end = Date.now() + ms;
  for (;;) {
    const evs = await events(page);
    if (test(evs)) return evs;
    if (Date.now() > end) fail(`${what}: not within ${ms} ms; events: ${JSON.stringify(evs.slice(-20))}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

const bodies = (evs, prefix) =>
  evs.filter((e) => e.kind === "message" && e.body.startsWith(prefix)).map((e) => e.body);

async function open(browser, port, token) {
  const page = await browser.newPage();
  page.on("console", (m) => process.env.VERBOSE && console.log(`[page] ${m.text()}`));
  const q = new URLSearchParams({ ws: WS_URL, token: JSON.stringify(token), hb: "500", reconnect: "300" });
  await page.goto(`http://127.0.0.1:${port}/index.html?${q}`);
  return page;
}

async function main() {
  const allowed = await pageServer(PAGE_PORT);
  const other = await pageServer(0);
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM,
    args: ["--no-sandbox", "--headless=new"],
  });
  const results = {};
  try {
    // goim's own token shape, with a key so the test can push to it.
    const tokenA = { mid: 123, key: "web-a", room_id: "live://1000", platform: "web", accepts: [1000, 1001, 1002] };
    const tokenB = { mid: 124, key: "web-b", room_id: "live://1000", platform: "web", accepts: [1000, 1001, 1002] };
    const a = await open(browser, PAGE_PORT, tokenA);
    await until(a, "A: AuthReply", (evs) => evs.some((e) => e.kind === "auth"));
    await until(a, "A: heartbeat reply with online 1", (evs) => evs.some((e) => e.kind === "heartbeat" && e.online === 1));
    const b = await open(browser, PAGE_PORT, tokenB);
    await until(b, "B: heartbeat reply with online 2", (evs) => evs.some((e) => e.kind === "heartbeat" && e.online === 2));
    results.heartbeat_online = 2;

    // By key, by user id, and an op the client does not accept (then a marker).
    await push("/goim/push/keys", "operation=1003&keys=web-a", "not-accepted");
    await push("/goim/push/keys", "operation=1000&keys=web-a", "to-a");
    await push("/goim/push/mids", "operation=1001&mids=124", "to-124");
    await until(a, "A: push by key", (evs) => bodies(evs, "to-a").length === 1);
    await until(b, "B: push by user id", (evs) => bodies(evs, "to-124").length === 1);

    // A room, one push at a time: in order at both.
    const ordered = Array.from({ length: 20 }, (_, i) => `seq-${i}`);
    for (const body of ordered) await push("/goim/push/room", "operation=1000&type=live&room=1000", body);
    for (const [name, page] of [["A", a], ["B", b]]) {
      const evs = await until(page, `${name}: 20 room pushes`, (evs) => bodies(evs, "seq-").length === 20);
      if (JSON.stringify(bodies(evs, "seq-")) !== JSON.stringify(ordered)) fail(`${name}: room pushes out of order`);
    }

    // Bursts of concurrent room pushes: each arrives once, and the writer batches
    // some into Raw frames (a round of 300 usually does; up to 5 rounds).
    let raws = 0;
    let rounds = 0;
    while (raws === 0 && rounds < 5) {
      const sent = Array.from({ length: 300 }, (_, i) => `burst-${rounds}-${i}`);
      await Promise.all(sent.map((body) => push("/goim/push/room", "operation=1002&type=live&room=1000", body)));
      for (const [name, page] of [["A", a], ["B", b]]) {
        const evs = await until(page, `${name}: burst ${rounds}`, (evs) => bodies(evs, `burst-${rounds}-`).length >= sent.length);
        const got = bodies(evs, `burst-${rounds}-`);
        if (got.length !== sent.length || new Set(got).size !== sent.length) fail(`${name}: burst ${rounds}: ${got.length} arrived, ${new Set(got).size} distinct, of ${sent.length}`);
        raws += evs.filter((e) => e.kind === "raw" && e.frames > 1).length;
      }
      rounds += 1;
    }
    if (raws === 0) fail("no Raw batch in 5 bursts of 300 room pushes");
    results.raw_batches = raws;
    results.burst_rounds = rounds;

    // A kick: DisconnectReply, close, reconnect, AuthReply again, and pushes arrive.
    execFileSync(KICK, ["kick", "--key", "web-a"], { stdio: "inherit" });
    await until(a, "A: DisconnectReply and close after a kick", (evs) => evs.some((e) => e.kind === "disconnect") && evs.some((e) => e.kind === "close"));
    await until(a, "A: reconnected", (evs) => evs.filter((e) => e.kind === "auth").length === 2);
    await push("/goim/push/keys", "operation=1000&keys=web-a", "after-kick");
    await until(a, "A: push after reconnecting", (evs) => bodies(evs, "after-kick").length === 1);

    const notAccepted = bodies(await events(a), "not-accepted").length;
    if (notAccepted !== 0) fail("A got a push with an op it does not accept");

    // A page from an origin not in client.ws_allowed_origins never gets AuthReply.
    const c = await open(browser, other.address().port, { mid: 125, key: "web-c", room_id: "live://1000" });
    const evs = await until(c, "C (other origin): refused", (evs) => evs.some((e) => e.kind === "close"));
    if (evs.some((e) => e.kind === "auth" || e.kind === "open")) fail("a page from a refused origin opened a session");
    await c.close();
    results.refused_origin = true;

    for (const [name, page] of [["A", a], ["B", b]]) {
      const v = (await events(page)).filter((e) => e.kind === "violation");
      if (v.length) fail(`${name}: ${JSON.stringify(v.slice(0, 5))}`);
      results[`messages_${name}`] = (await events(page)).filter((e) => e.kind === "message").length;
    }
    console.log(`browser test passed: ${JSON.stringify(results)}`);
  } finally {
    await browser.close();
    allowed.close();
    other.close();
  }
}

main().catch((e) => fail(e.stack || String(e)));
