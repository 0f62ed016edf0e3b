// The operator page: the cluster as this node sees it (members with their state and
// load, the Raft leader and term, the ring epoch), a few live charts, and drain/remove
// with confirmation. It reads the node's admin API with the admin token (GET
// /admin/cluster, /metrics; POST /admin/drain, /admin/remove).

const REFRESH_MS = 2000;
const POINTS_MAX = 90;

export class Operator {
  constructor({ token, onError, elements }) {
    this.token = token;
    this.onError = onError;
    this.el = elements;
    this.timer = null;
    this.series = { connections: [], rooms: [], frames: [] };
    this.lastFrames = null;
  }

  headers() {
    return { authorization: `Bearer ${this.token}` };
  }

  async fetchJson(path, init = {}) {
    const response = await fetch(path, { ...init, headers: { ...this.headers(), ...(init.headers || {}) } });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(body.error || `${path}: HTTP ${response.status}`);
    return body;
  }

  /** Checks the token, then refreshes every 2 s until `stop`. */
  async start() {
    await this.refresh();
    this.timer = setInterval(() => this.refresh().catch((e) => this.onError(e)), REFRESH_MS);
  }

  stop() {
    clearInterval(this.timer);
    this.timer = null;
  }

  async refresh() {
    const status = await this.fetchJson("/admin/cluster");
    this.render(status);
    let connections = 0;
    let rooms = 0;
    for (const m of status.members || []) {
      if (m.load) {
        connections += m.load.connections;
        rooms += m.load.rooms;
      }
    }
    this.push("connections", connections);
    this.push("rooms", rooms);
    const frames = await this.framesSent();
    if (frames !== null) {
      const now = performance.now();
      if (this.lastFrames) {
        const rate = ((frames - this.lastFrames.value) * 1000) / Math.max(1, now - this.lastFrames.at);
        this.push("frames", Math.max(0, rate));
      }
      this.lastFrames = { value: frames, at: now };
    }
    this.draw();
  }

  /** `chorus_frames_out_total` from this node's /metrics (absent when metrics have their own listener). */
  async framesSent() {
    const response = await fetch("/metrics", { headers: this.headers() }).catch(() => null);
    if (!response || !response.ok) return null;
    const text = await response.text();
    let total = 0;
    let found = false;
    for (const line of text.split("\n")) {
      if (line.startsWith("chorus_frames_out_total")) {
        total += Number(line.trim().split(/\s+/).pop()) || 0;
        found = true;
      }
    }
    return found ? total : null;
  }

  push(name, value) {
    const s = this.series[name];
    s.push(value);
    if (s.length > POINTS_MAX) s.shift();
  }

  render(status) {
    const e = this.el;
    e.node.textContent = `${status.node_name} (node ${status.self})`;
    e.leader.textContent = status.leader === null || status.leader === undefined ? "none" : String(status.leader);
    e.term.textContent = String(status.term);
    e.epoch.textContent = String(status.ring_epoch);
    const rows = (status.members || []).map((m) => {
      const load = m.load || {};
      const cell = (text) => {
        const td = document.createElement("td");
        td.textContent = text;
        return td;
      };
      const tr = document.createElement("tr");
      tr.dataset.member = String(m.id);
      tr.dataset.state = m.state;
      const leader = m.id === status.leader ? " (leader)" : "";
      tr.append(
        cell(String(m.id)),
        cell(m.name + leader),
        cell(m.state),
        cell(m.http_addr || ""),
        cell(m.load ? String(load.connections) : "?"),
        cell(m.load ? String(load.sessions) : "?"),
        cell(m.load ? String(load.rooms) : "?"),
      );
      const actions = document.createElement("td");
      for (const [label, path] of [["Drain", "/admin/drain"], ["Remove", "/admin/remove"]]) {
        const button = document.createElement("button");
        button.type = "button";
        button.textContent = label;
        button.setAttribute("aria-label", `${label} ${m.name}`);
        button.addEventListener("click", () => this.act(label, path, m));
        actions.append(button);
      }
      tr.append(actions);
      return tr;
    });
    e.members.replaceChildren(...rows);
  }

  async act(label, path, member) {
    const what = label === "Drain"
      ? `Drain ${member.name}? Its rooms move to the other members; clients keep their connections.`
      : `Remove ${member.name} from the cluster? It leaves the Raft group; this cannot be undone.`;
    if (!confirm(what)) return;
    try {
      await this.fetchJson(`${path}?node=${member.id}`, { method: "POST" });
      await this.refresh();
    } catch (error) {
      this.onError(error);
    }
  }

  draw() {
    for (const [name, canvas] of Object.entries(this.el.charts)) {
      const values = this.series[name];
      const ctx = canvas.getContext("2d");
      const { width, height } = canvas;
      ctx.clearRect(0, 0, width, height);
      if (values.length === 0) continue;
      const max = Math.max(1, ...values);
      ctx.strokeStyle = "#3452c7";
      ctx.lineWidth = 2;
      ctx.beginPath();
      values.forEach((v, i) => {
        const x = (i / Math.max(1, POINTS_MAX - 1)) * (width - 8) + 4;
        const y = height - 14 - (v / max) * (height - 24);
        if (i === 0) ctx.moveTo(x, y);
        else ctx.lineTo(x, y);
      });
      ctx.stroke();
      ctx.fillStyle = "#5b616e";
      ctx.font = "11px system-ui, sans-serif";
      ctx.fillText(`now ${Math.round(values[values.length - 1])} · max ${Math.round(max)}`, 6, height - 2);
    }
  }
}
