// The Chorus web app: sign in, discover rooms, and take part in one (comments,
// reactions, bullets, the stage). Plain ES modules, no build step; served by every node
// from files embedded in the `chorus` binary.

import { ChorusClient, describe } from "./client.js";
import { Voice, voiceSupported } from "./voice.js";
import { Operator } from "./operator.js";
import { Shows } from "./shows.js";
import { VoiceMessages } from "./vm.js";

const $ = (id) => document.getElementById(id);
const ROOM_PAGE = 20;
const COMMENTS_SHOWN_MAX = 500;

const app = {
  client: null,
  user: null,
  token: null,
  room: null, // the open room's state
  listAfter: null,
};

// ------------------------------------------------------------------ helpers --

function showError(error) {
  const box = $("error");
  box.textContent = describe(error);
  box.hidden = false;
  clearTimeout(showError.timer);
  showError.timer = setTimeout(() => { box.hidden = true; }, 8000);
}

function clearError() {
  $("error").hidden = true;
}

function show(section) {
  for (const id of ["signin", "rooms", "room", "operator", "messages"]) $(id).hidden = id !== section;
}

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child);
  return node;
}

async function guarded(action) {
  try {
    clearError();
    return await action();
  } catch (error) {
    showError(error);
    return undefined;
  }
}

function randomId() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function wsUrl() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}/ws`;
}

// ------------------------------------------------------------------ sign-in --

async function devToken(user) {
  const response = await fetch("/dev/token", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ user }),
  });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || `the node refused (${response.status})`);
  return body.token;
}

function tokenUser(token) {
  try {
    const payload = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(payload)).sub || "?";
  } catch {
    return "?";
  }
}

async function signIn(user, token) {
  app.user = user;
  app.token = token;
  const client = new ChorusClient({
    url: wsUrl(),
    // A development token is minted again on each reconnect; a pasted one is reused.
    token: async () => (app.devUser ? devToken(app.devUser) : app.token),
  });
  client.addEventListener("state", (e) => renderState(e.detail));
  client.addEventListener("notification", (e) => onNotification(e.detail.kind, e.detail.body));
  client.addEventListener("resync", () => rejoinAfterResync());
  app.client = client;
  await client.connect();
  app.voice = new Voice(client, client.auth.user_id);
  app.shows = new Shows({ client, user: client.auth.user_id, onError: showError, $ });
  app.vm = new VoiceMessages({
    client,
    user: client.auth.user_id,
    token: async () => (app.devUser ? devToken(app.devUser) : app.token),
    onError: showError,
  });
  app.vm.addEventListener("change", () => renderMessages());
  $("who").textContent = `Signed in as ${client.auth.user_id}`;
  $("signout").hidden = false;
  sessionStorage.setItem("chorus.signin", JSON.stringify({ devUser: app.devUser || null, token: app.devUser ? null : token }));
  show("rooms");
  await loadRooms(true);
}

function renderState({ state, node, reason }) {
  const badge = $("conn");
  badge.dataset.state = state;
  badge.textContent = {
    idle: "not connected",
    connecting: "connecting…",
    live: node ? `live · ${node}` : "live",
    reconnecting: "reconnecting…",
    closed: reason ? `disconnected: ${reason}` : "disconnected",
  }[state] || state;
}

$("dev-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const user = $("dev-user").value.trim();
  guarded(async () => {
    const token = await devToken(user);
    app.devUser = user;
    await signIn(user, token);
  });
});

$("operator-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const token = $("admin-token").value.trim();
  guarded(async () => {
    if (app.operator) app.operator.stop();
    app.operator = new Operator({
      token,
      onError: showError,
      elements: {
        node: $("op-node"),
        leader: $("op-leader"),
        term: $("op-term"),
        epoch: $("op-epoch"),
        members: document.querySelector("#members tbody"),
        charts: {
          connections: $("chart-connections"),
          rooms: $("chart-rooms"),
          frames: $("chart-frames"),
        },
      },
    });
    await app.operator.start();
    show("operator");
  });
});

$("operator-back").addEventListener("click", () => {
  if (app.operator) app.operator.stop();
  app.operator = null;
  show(app.client ? "rooms" : "signin");
});

$("token-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const token = $("token").value.trim();
  guarded(async () => {
    app.devUser = null;
    await signIn(tokenUser(token), token);
  });
});

$("signout").addEventListener("click", () => {
  if (app.voice) app.voice.leave();
  if (app.client) app.client.close();
  app.client = null;
  app.room = null;
  sessionStorage.removeItem("chorus.signin");
  $("who").textContent = "";
  $("signout").hidden = true;
  show("signin");
});

// -------------------------------------------------------------------- rooms --

async function loadRooms(fresh) {
  const body = { limit: ROOM_PAGE };
  const state = $("list-state").value;
  if (state) body.state = state;
  if (!fresh && app.listAfter) body.after = app.listAfter;
  // The list changes only when the answer is here: no flicker, no empty moment.
  const page = await app.client.request("room.list", body);
  const items = page.rooms.map(roomItem);
  if (fresh) {
    if (items.length === 0) items.push(el("li", { class: "meta", text: "No rooms yet: create one." }));
    $("room-list").replaceChildren(...items);
  } else {
    $("room-list").append(...items);
  }
  app.listAfter = page.next;
  $("more").hidden = !page.next;
  $("room-list").dataset.loaded = String(Date.now());
}

function roomItem(room) {
  const listeners = room.listener_count === null || room.listener_count === undefined
    ? "?" : String(room.listener_count);
  const when = room.state === "scheduled" && room.scheduled_start_ms
    ? `starts ${new Date(room.scheduled_start_ms).toLocaleString()}` : room.state;
  return el("li", { "data-room": room.room_id },
    el("span", { class: "title", text: room.title }),
    el("span", { class: "meta", text: `${room.host} · ${when} · ${listeners} listening` }),
    el("button", { type: "button", onclick: () => guarded(() => openRoom(room.room_id)), "aria-label": `Join ${room.title}` }, "Join"),
  );
}

$("refresh").addEventListener("click", () => guarded(() => loadRooms(true)));
$("list-state").addEventListener("change", () => guarded(() => loadRooms(true)));
$("more").addEventListener("click", () => guarded(() => loadRooms(false)));

$("create-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const title = $("create-title").value.trim();
  guarded(async () => {
    const ok = await app.client.request("room.create", { title });
    $("create-title").value = "";
    await openRoom(ok.room_id);
  });
});

// --------------------------------------------------------------------- room --

async function openRoom(roomId) {
  const joined = await app.client.join(roomId);
  app.room = {
    id: roomId,
    info: joined.room,
    role: joined.role,
    stage: joined.stage,
    comments: new Map(),
    reactions: {},
    speaking: new Set(),
    polls: new Map(),
    votes: new Map(),
  };
  for (const poll of joined.polls || []) app.room.polls.set(poll.poll_id, poll);
  for (const c of joined.recent_comments || []) app.room.comments.set(c.comment_id, c);
  app.voice.enter(roomId);
  app.shows.reset();
  $("people").open = false;
  show("room");
  renderRoomHead();
  renderStage();
  renderComments();
  renderReactions();
  renderPolls();
  $("comment-text").focus();
}

function isModerator() {
  const r = app.room;
  if (!r) return false;
  const me = app.client.auth.user_id;
  return r.stage.host === me || (r.stage.moderators || []).includes(me);
}

function roleOf(user) {
  const s = app.room.stage;
  if (s.host === user) return "host";
  if ((s.moderators || []).includes(user)) return "moderator";
  if ((s.speakers || []).includes(user)) return "speaker";
  return "listener";
}

function renderRoomHead() {
  const r = app.room;
  $("room-title").textContent = r.info.title;
  $("room-host").textContent = r.info.host;
  $("room-state").textContent = r.info.state;
  $("listeners").textContent = String(r.info.listener_count);
  $("end").hidden = r.info.host !== app.client.auth.user_id;
}

function renderStage() {
  const r = app.room;
  const s = r.stage;
  const me = app.client.auth.user_id;
  const onStage = [s.host, ...(s.moderators || []), ...(s.speakers || [])];
  const list = $("stage-list");
  list.replaceChildren();
  for (const user of onStage) {
    const muted = (s.muted || []).includes(user);
    const speaking = r.speaking.has(user);
    const label = `${user}, ${roleOf(user)}${muted ? ", muted" : ""}${speaking ? ", speaking" : ""}`;
    const item = el("li", { "data-user": user, class: speaking ? "speaking" : "", "aria-label": label },
      el("span", { text: user }),
      el("span", { class: "role", text: roleOf(user) + (muted ? " · muted" : "") }),
    );
    if (isModerator() && user !== s.host && user !== me && !muted) {
      item.append(el("button", { type: "button", "aria-label": `Mute ${user}`, onclick: () => stageAction("room.mute", { user_id: user, muted: true }) }, "Mute"));
    }
    if (isModerator() && user !== s.host && user !== me && roleOf(user) === "speaker") {
      item.append(el("button", { type: "button", "aria-label": `Move ${user} to the audience`, onclick: () => stageAction("room.set_role", { user_id: user, role: "listener" }) }, "To audience"));
    }
    list.append(item);
  }
  const listener = roleOf(me) === "listener";
  const raised = (s.hands || []).includes(me) || r.handRaised;
  $("hand").hidden = !listener;
  $("hand").textContent = raised ? "Lower hand" : "Raise hand";
  $("hand").dataset.raised = raised ? "1" : "";
  const hands = $("hands-list");
  hands.replaceChildren();
  $("hands-box").hidden = !isModerator() || (s.hands || []).length === 0;
  for (const user of s.hands || []) {
    hands.append(el("li", { "data-hand": user },
      el("span", { text: user }),
      el("button", { type: "button", "aria-label": `Invite ${user} to speak`, onclick: () => stageAction("room.invite", { user_id: user }) }, "Invite to speak"),
      el("button", { type: "button", "aria-label": `Kick ${user}`, onclick: () => stageAction("room.kick", { user_id: user }) }, "Kick"),
    ));
  }
  $("invite-box").hidden = !r.invited;
  const onStageMe = !listener;
  const mutedMe = (s.muted || []).includes(me);
  if (!onStageMe && app.voice.talking) app.voice.stopTalking();
  $("talk").hidden = !onStageMe || !voiceSupported();
  $("talk").textContent = app.voice.talking ? "Stop talking" : "Start talking";
  $("mute-self").hidden = !onStageMe;
  $("mute-self").textContent = mutedMe ? "Unmute me" : "Mute me";
  $("mute-self").dataset.muted = mutedMe ? "1" : "";
  app.voice.muted = mutedMe;
  $("audio-note").hidden = voiceSupported();
  $("audio-note").textContent = "This browser cannot play or send live audio (no WebCodecs Opus).";
}

const PEOPLE_PAGE = 50;

async function loadPeople(fresh) {
  const r = app.room;
  if (!r) return;
  const body = { room_id: r.id, limit: PEOPLE_PAGE };
  if (!fresh && r.peopleNext) body.after = r.peopleNext;
  const page = await app.client.request("room.members", body);
  const me = app.client.auth.user_id;
  const items = page.users.map((u) => {
    const item = el("li", { "data-person": u.user_id },
      el("span", { class: "name", text: u.user_id }),
      el("span", { class: "meta", text: u.role }));
    const host = r.stage.host === me;
    if (host && u.user_id !== me && u.role !== "moderator") {
      item.append(el("button", { type: "button", "aria-label": `Make ${u.user_id} a moderator`, onclick: () => stageAction("room.set_role", { user_id: u.user_id, role: "moderator" }) }, "Make moderator"));
    }
    if (host && u.role === "moderator") {
      item.append(el("button", { type: "button", "aria-label": `Make ${u.user_id} a listener again`, onclick: () => stageAction("room.set_role", { user_id: u.user_id, role: "listener" }) }, "Unmake moderator"));
    }
    if (isModerator() && u.user_id !== me && u.role !== "host") {
      if (u.role === "listener") {
        item.append(el("button", { type: "button", "aria-label": `Invite ${u.user_id} to speak`, onclick: () => stageAction("room.invite", { user_id: u.user_id }) }, "Invite"));
      }
      item.append(
        el("button", { type: "button", "aria-label": `Kick ${u.user_id}`, onclick: () => confirm(`Remove ${u.user_id} from the room now?`) && stageAction("room.kick", { user_id: u.user_id }) }, "Kick"),
        el("button", { type: "button", "aria-label": `Block ${u.user_id}`, onclick: () => confirm(`Block ${u.user_id} from this room?`) && stageAction("room.block", { user_id: u.user_id, blocked: true }) }, "Block"));
    }
    return item;
  });
  if (fresh) $("people-list").replaceChildren(...items);
  else $("people-list").append(...items);
  r.peopleNext = page.next;
  $("people-more").hidden = !page.next;
  $("people").querySelector("summary").textContent = `People in the room (${page.count})`;
}

$("people").addEventListener("toggle", () => {
  if ($("people").open) guarded(() => loadPeople(true));
});
$("people-more").addEventListener("click", () => guarded(() => loadPeople(false)));

async function stageAction(kind, body) {
  await guarded(async () => {
    await app.client.request(kind, { room_id: app.room.id, ...body });
    await refreshStage();
  });
}

async function refreshStage() {
  if (!app.room) return;
  app.room.stage = await app.client.request("room.stage", { room_id: app.room.id });
  renderStage();
  if ($("people").open) await loadPeople(true);
}

function renderComments() {
  const list = $("comments");
  const ids = [...app.room.comments.keys()].sort((a, b) => a - b);
  const shown = ids.slice(-COMMENTS_SHOWN_MAX);
  list.replaceChildren(...shown.map((id) => {
    const c = app.room.comments.get(id);
    return el("li", { "data-comment": String(id) },
      el("span", { class: "author", text: c.user_id }),
      el("span", { class: "text", text: c.text }));
  }));
  list.scrollTop = list.scrollHeight;
}

function renderPolls() {
  const r = app.room;
  $("poll-form").hidden = !isModerator();
  const list = $("poll-list");
  const polls = [...r.polls.values()].sort((a, b) => b.poll_id - a.poll_id);
  list.replaceChildren(...polls.map((poll) => {
    const total = poll.tallies.reduce((a, b) => a + b, 0);
    const open = poll.state === "open";
    const options = poll.options.map((option, i) => {
      const votes = poll.tallies[i] || 0;
      const bar = el("span");
      bar.style.width = `${total ? Math.round((100 * votes) / total) : 0}%`;
      const mine = r.votes.get(poll.poll_id) === i;
      return el("div", { class: "option" },
        el("button", {
          type: "button",
          "aria-label": `Vote ${option} in poll ${poll.poll_id}`,
          "aria-pressed": mine ? "true" : "false",
          onclick: () => vote(poll.poll_id, i),
          ...(open ? {} : { disabled: "" }),
        }, option),
        el("div", { class: "bar" }, bar),
        el("span", { class: "count", "data-tally": String(i), text: String(votes) }));
    });
    const item = el("li", { "data-poll": String(poll.poll_id), "data-state": poll.state },
      el("div", { class: "question", text: poll.question }),
      el("div", { class: "meta", text: `${open ? "open" : "closed"} · ${poll.voters} voted · by ${poll.by}` }),
      el("div", { class: "options" }, ...options));
    if (open && isModerator()) {
      item.append(el("button", { type: "button", "aria-label": `Close poll ${poll.poll_id}`, onclick: () => closePoll(poll.poll_id) }, "Close poll"));
    }
    return item;
  }));
}

async function vote(pollId, option) {
  await guarded(async () => {
    await app.client.request("room.vote", { room_id: app.room.id, poll_id: pollId, option });
    app.room.votes.set(pollId, option);
    renderPolls();
  });
}

async function closePoll(pollId) {
  await guarded(async () => {
    const poll = await app.client.request("room.poll_close", { room_id: app.room.id, poll_id: pollId });
    app.room.polls.set(poll.poll_id, poll);
    renderPolls();
  });
}

$("poll-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const question = $("poll-question").value.trim();
  const options = $("poll-options").value.split("\n").map((o) => o.trim()).filter(Boolean);
  guarded(async () => {
    const poll = await app.client.request("room.poll_create", { room_id: app.room.id, question, options });
    app.room.polls.set(poll.poll_id, poll);
    $("poll-question").value = "";
    $("poll-options").value = "";
    renderPolls();
  });
});

function renderReactions() {
  for (const button of document.querySelectorAll(".react")) {
    button.querySelector("span").textContent = String(app.room.reactions[button.dataset.emoji] || 0);
  }
}

function flyBullet(bullet) {
  const span = el("span", { text: `${bullet.user_id}: ${bullet.text}` });
  span.style.top = `${Math.floor(Math.random() * 1.2)}rem`;
  $("bullets").append(span);
  setTimeout(() => span.remove(), 6500);
}

function onNotification(kind, body) {
  if (app.vm && app.vm.notify(kind, body)) return;
  const r = app.room;
  if (!r || (body.room_id && body.room_id !== r.id)) {
    if (kind === "room.live" && !$("rooms").hidden) guarded(() => loadRooms(true));
    return;
  }
  if (app.shows.notify(kind, body)) return;
  switch (kind) {
    case "room.comment":
      r.comments.set(body.comment_id, body);
      renderComments();
      break;
    case "room.reactions":
      for (const [emoji, n] of Object.entries(body.counts || {})) r.reactions[emoji] = (r.reactions[emoji] || 0) + n;
      renderReactions();
      break;
    case "room.listeners":
      r.info.listener_count = body.count;
      renderRoomHead();
      break;
    case "room.poll":
      r.polls.set(body.poll_id, body);
      renderPolls();
      break;
    case "room.bullets":
      for (const b of body.bullets || []) flyBullet(b);
      break;
    case "room.speaking":
      r.speaking = new Set((body.speakers || []).map((s) => s.user_id));
      renderStage();
      break;
    case "room.stage": {
      const me = app.client.auth.user_id;
      if (body.user_id === me && body.action === "invited") r.invited = true;
      if (body.user_id === me && (body.action === "kicked" || body.action === "blocked")) {
        showError(new Error(body.action === "kicked" ? "You were removed from the room." : "You were blocked from the room."));
        leaveRoom(false);
        return;
      }
      if (body.user_id === me && body.action === "hand_raised") r.handRaised = true;
      if (body.user_id === me && body.action === "hand_lowered") r.handRaised = false;
      guarded(refreshStage);
      break;
    }
    case "room.ended":
      showError(new Error(`The room was ended by ${body.by}.`));
      leaveRoom(false);
      break;
    default:
      break;
  }
}

async function rejoinAfterResync() {
  // A new session is in no room (§5.6): join the open room again.
  if (app.room) await guarded(() => openRoom(app.room.id));
}

async function leaveRoom(tell) {
  const room = app.room;
  app.room = null;
  app.voice.leave();
  app.shows.reset();
  if (tell && room) await guarded(() => app.client.leave(room.id));
  show("rooms");
  await guarded(() => loadRooms(true));
}

$("back").addEventListener("click", () => leaveRoom(true));
$("end").addEventListener("click", () => {
  if (!app.room || !confirm("End this room for everyone?")) return;
  guarded(() => app.client.request("room.end", { room_id: app.room.id }));
});

$("comment-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const input = $("comment-text");
  const text = input.value;
  guarded(async () => {
    const requestId = randomId();
    await app.client.request("room.comment", { room_id: app.room.id, text, request_id: requestId });
    input.value = "";
  });
});

$("bullet-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const input = $("bullet-text");
  guarded(async () => {
    await app.client.request("room.bullet", { room_id: app.room.id, text: input.value });
    input.value = "";
  });
});

for (const button of document.querySelectorAll(".react")) {
  button.addEventListener("click", () => guarded(() => app.client.request("room.react", { room_id: app.room.id, emoji: button.dataset.emoji })));
}

$("hand").addEventListener("click", () => {
  const raised = !$("hand").dataset.raised;
  guarded(async () => {
    await app.client.request("room.hand", { room_id: app.room.id, raised });
    app.room.handRaised = raised;
    renderStage();
  });
});

$("talk").addEventListener("click", () => guarded(async () => {
  if (app.voice.talking) app.voice.stopTalking();
  else await app.voice.startTalking();
  renderStage();
}));

$("mute-self").addEventListener("click", () => {
  const muted = !$("mute-self").dataset.muted;
  guarded(async () => {
    await app.client.request("room.mute", { room_id: app.room.id, muted });
    await refreshStage();
  });
});

for (const [id, accept] of [["accept", true], ["decline", false]]) {
  $(id).addEventListener("click", () => guarded(async () => {
    await app.client.request("room.invite_answer", { room_id: app.room.id, accept });
    app.room.invited = false;
    await refreshStage();
  }));
}

// ----------------------------------------------------------- voice messages --

function renderMessages() {
  if (!app.vm || $("messages").hidden) return;
  const me = app.client.auth.user_id;
  $("vm-device").textContent = app.vm.device;
  const rec = app.vm.recording;
  $("vm-record").hidden = Boolean(rec);
  $("vm-stop").hidden = !rec;
  if (rec) {
    $("vm-progress").textContent = `Recording to ${rec.to.join(", ")}: ${(rec.durationMs / 1000).toFixed(1)} s, ${rec.acked} bytes stored on the cluster`;
  }
  $("vm-list").replaceChildren(...app.vm.list().map((entry) => {
    const s = entry.state;
    const progress = app.vm.progress.get(entry.message_id);
    const status = progress ? progress.status : s.upload;
    const seconds = ((progress ? progress.duration_ms : s.duration_ms) / 1000).toFixed(1);
    const who = entry.sender === me ? `to ${entry.conversation.replace(/^direct:/, "").split(":").filter((u) => u !== me).join(", ")}` : `from ${entry.sender}`;
    const playing = app.vm.playing === entry.message_id;
    return el("li", { "data-message": entry.message_id, "data-read": String(s.read), "data-upload": status },
      el("span", { class: "title", text: `${who} · ${seconds} s` }),
      el("span", { class: "meta", text: `${status === "uploading" ? "still recording" : status} · ${s.read ? "read" : "new"}${s.play ? ` · played to ${(s.play.position_ms / 1000).toFixed(1)} s` : ""}` }),
      el("button", {
        type: "button",
        "aria-label": `Play the message ${who}`,
        onclick: () => guarded(() => app.vm.play(entry.message_id)),
        ...(playing ? { disabled: "" } : {}),
      }, playing ? "Playing…" : "Play"));
  }));
  if (app.vm.list().length === 0) $("vm-list").append(el("li", { class: "meta", text: "No voice messages yet." }));
}

$("open-messages").addEventListener("click", () => guarded(async () => {
  show("messages");
  await app.vm.sync();
  renderMessages();
}));

$("messages-back").addEventListener("click", () => {
  show("rooms");
  guarded(() => loadRooms(true));
});

$("vm-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const to = $("vm-to").value.split(",").map((u) => u.trim()).filter(Boolean);
  guarded(async () => {
    await app.vm.record(to);
    renderMessages();
  });
});

$("vm-stop").addEventListener("click", () => guarded(async () => {
  const rec = await app.vm.stop();
  if (rec) $("vm-progress").textContent = `Sent: ${(rec.durationMs / 1000).toFixed(1)} s, ${rec.acked} bytes, ${rec.status}.`;
  renderMessages();
}));

// Test hooks: the browser tests cut the connection as a network would.
window.chorus = {
  drop: () => app.client && app.client.drop(),
  state: () => (app.client ? app.client.state : "idle"),
  decoded: () => (app.voice ? app.voice.decoded : 0),
  room: () => (app.room ? app.room.id : null),
  vmDecoded: () => (app.vm ? app.vm.decodedFrames : 0),
  sent: () => (app.voice ? app.voice.sent : 0),
};

// Development sign-in only where the node offers it.
fetch("/dev/token").then((r) => r.json()).then((info) => {
  $("dev-form").hidden = !info.available;
}).catch(() => { $("dev-form").hidden = true; });

// Sign in again after a reload.
const saved = JSON.parse(sessionStorage.getItem("chorus.signin") || "null");
if (saved && (saved.devUser || saved.token)) {
  guarded(async () => {
    app.devUser = saved.devUser;
    const token = saved.devUser ? await devToken(saved.devUser) : saved.token;
    await signIn(saved.devUser || tokenUser(token), token);
  });
} else {
  show("signin");
}
