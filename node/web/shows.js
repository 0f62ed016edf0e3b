// The live quiz and the red-packet rain on the room screen (docs/protocol.md §6.15,
// §6.16, §7.10-7.13): a question with its countdown and an answer, the sealed verdict
// opened when the answer is announced, the payout at the end; a rain with a tap button
// that honours the throttle the server pushed, and what the user won.

import { openVerdict } from "./seal.js";

const cents = (n) => (n / 100).toFixed(2);

function randomId() {
  const bytes = crypto.getRandomValues(new Uint8Array(12));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

export class Shows {
  constructor({ client, user, onError, $ }) {
    this.client = client;
    this.user = user;
    this.onError = onError;
    this.$ = $;
    this.quiz = null; // { id, question, sealed: Map(question → hex), verdicts: Map, out }
    this.rain = null; // { id, throttle, endMs, won, packets, taps }
    this.timer = null;
    $("rain-tap").addEventListener("click", () => this.tap());
  }

  reset() {
    this.quiz = null;
    this.rain = null;
    clearInterval(this.timer);
    this.timer = null;
    this.$("quiz").hidden = true;
    this.$("rain").hidden = true;
  }

  tick() {
    const $ = this.$;
    const now = Date.now();
    if (this.quiz && this.quiz.question) {
      const left = Math.max(0, Math.ceil((this.quiz.question.deadline_ms - now) / 1000));
      $("quiz-countdown").textContent = this.quiz.answered === undefined && left > 0
        ? `${left} s to answer` : left > 0 ? `${left} s left` : "time is up";
    }
    if (this.rain && !this.rain.over) {
      const left = Math.max(0, Math.ceil((this.rain.endMs - now) / 1000));
      const starts = Math.ceil((this.rain.startMs - now) / 1000);
      $("rain-info").textContent = starts > 0
        ? `${this.rain.count} packets · starts in ${starts} s`
        : left > 0 ? `${this.rain.count} packets · ${left} s left` : "the rain is over";
    }
  }

  ensureTimer() {
    if (!this.timer) this.timer = setInterval(() => this.tick(), 250);
  }

  /** Handles a quiz or rain notification; whether it was one. */
  notify(kind, body) {
    switch (kind) {
      case "quiz.question": this.question(body); return true;
      case "quiz.result": this.keepSealed(body); return true;
      case "quiz.announce": this.announce(body); return true;
      case "quiz.finished": this.finished(body); return true;
      case "rain.start": this.rainStart(body); return true;
      case "rain.ended": this.rainEnded(body); return true;
      default: return false;
    }
  }

  question(q) {
    const $ = this.$;
    if (!this.quiz || this.quiz.id !== q.quiz_id) {
      this.quiz = { id: q.quiz_id, sealed: new Map(), verdicts: new Map() };
    }
    this.quiz.question = q;
    this.quiz.answered = undefined;
    $("quiz").hidden = false;
    $("quiz-progress").textContent = `Question ${q.index + 1} of ${q.questions}`;
    $("quiz-question").textContent = q.text;
    $("quiz-status").textContent = "Pick an answer before the time is up.";
    $("quiz-options").replaceChildren(...q.options.map((option, i) => {
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = option;
      button.dataset.option = String(i);
      button.setAttribute("aria-label", `Answer ${option}`);
      button.addEventListener("click", () => this.answer(q, i));
      return button;
    }));
    this.ensureTimer();
    this.tick();
  }

  async answer(q, option) {
    const $ = this.$;
    if (this.quiz.answered !== undefined) return;
    this.quiz.answered = option;
    for (const b of $("quiz-options").querySelectorAll("button")) {
      b.disabled = true;
      b.setAttribute("aria-pressed", b.dataset.option === String(option) ? "true" : "false");
    }
    try {
      const result = await this.client.request("quiz.answer", { quiz_id: q.quiz_id, question: q.index, option });
      this.keepSealed(result);
      $("quiz-status").textContent = "Answer sent. Your verdict is sealed until the answer is announced.";
    } catch (error) {
      this.quiz.answered = undefined;
      for (const b of $("quiz-options").querySelectorAll("button")) b.disabled = false;
      this.onError(error);
    }
  }

  keepSealed(result) {
    if (!this.quiz || this.quiz.id !== result.quiz_id) {
      this.quiz = { id: result.quiz_id, sealed: new Map(), verdicts: new Map() };
    }
    this.quiz.sealed.set(result.question, result.sealed);
  }

  announce(a) {
    const $ = this.$;
    if (!this.quiz || this.quiz.id !== a.quiz_id) return;
    const sealed = this.quiz.sealed.get(a.question);
    let verdict = "late";
    let words;
    if (sealed) {
      try {
        verdict = openVerdict(a.key, a.quiz_id, a.question, this.user, sealed);
      } catch (error) {
        verdict = "unreadable";
        this.onError(error);
      }
      words = {
        correct: "Correct! You go on.",
        revived: "Wrong, but a revive card saved you: you go on.",
        wrong: "Wrong: you are out.",
        late: "Too late: you are out.",
      }[verdict] || `Verdict: ${verdict}`;
    } else {
      words = "You did not answer in time: you are out.";
    }
    this.quiz.verdicts.set(a.question, verdict);
    if (verdict !== "correct" && verdict !== "revived") this.quiz.out = true;
    $("quiz-status").textContent = words;
    $("quiz-status").dataset.verdict = verdict;
    for (const b of $("quiz-options").querySelectorAll("button")) {
      b.disabled = true;
      const i = Number(b.dataset.option);
      if (i === a.correct) b.classList.add("right");
      b.textContent = `${b.textContent.replace(/ · \d+$/, "")} · ${a.counts[i] ?? 0}`;
    }
  }

  finished(f) {
    const $ = this.$;
    if (!this.quiz || this.quiz.id !== f.quiz_id) this.quiz = { id: f.quiz_id, sealed: new Map(), verdicts: new Map() };
    $("quiz").hidden = false;
    $("quiz-question").textContent = "The show is over.";
    $("quiz-options").replaceChildren();
    $("quiz-countdown").textContent = "";
    const won = !this.quiz.out && this.quiz.verdicts.size > 0;
    $("quiz-status").textContent = f.winners === 0
      ? "Nobody answered every question: no prize is paid."
      : won
        ? `You won! ${f.winners} winner(s) share ${cents(f.prize_cents)}: about ${cents(f.share_cents)} each.`
        : `${f.winners} winner(s) share ${cents(f.prize_cents)}: ${cents(f.share_cents)} each.`;
    $("quiz-status").dataset.verdict = won ? "winner" : "finished";
  }

  rainStart(r) {
    const $ = this.$;
    if (this.rain && this.rain.id === r.rain_id) {
      this.rain.throttle = r.throttle; // a new pool owner pushes it again
      return;
    }
    this.rain = { id: r.rain_id, throttle: r.throttle, startMs: r.start_ms, endMs: r.end_ms, count: r.count, won: 0, packets: 0, taps: 0, over: false };
    $("rain").hidden = false;
    $("rain-tap").disabled = false;
    $("rain-won").textContent = "Tap to grab a red packet!";
    $("rain-won").dataset.cents = "0";
    this.ensureTimer();
    this.tick();
  }

  async tap() {
    const rain = this.rain;
    if (!rain || rain.over) return;
    rain.taps += 1;
    // Each tap is sent with the probability the server asked for (§7.13).
    if (Math.random() >= rain.throttle) return;
    const requestId = randomId();
    for (let attempt = 0; attempt < 3; attempt++) {
      try {
        const answer = await this.client.request("rain.grab", { rain_id: rain.id, request_id: requestId });
        if (typeof answer.throttle === "number") rain.throttle = answer.throttle;
        this.showGrab(rain, answer);
        return;
      } catch (error) {
        // A retry with the same request id is never paid twice (§6.16).
        if (error.code !== 5001 && error.code !== 0) {
          this.onError(error);
          return;
        }
      }
    }
  }

  showGrab(rain, answer) {
    const $ = this.$;
    switch (answer.result) {
      case "granted":
        rain.won += answer.amount;
        rain.packets += 1;
        $("rain-won").textContent = `You got ${cents(rain.won)} in ${rain.packets} packet(s).`;
        $("rain-won").dataset.cents = String(rain.won);
        break;
      case "cap_reached":
        $("rain-won").textContent = `You got ${cents(rain.won)} in ${rain.packets} packet(s): that is as many as one person may get.`;
        $("rain-tap").disabled = true;
        break;
      case "none_left":
        $("rain-won").textContent = `Every packet is taken. You got ${cents(rain.won)}.`;
        $("rain-tap").disabled = true;
        break;
      case "ended":
        rain.over = true;
        $("rain-tap").disabled = true;
        break;
      default:
        break; // throttled, not started: tap again
    }
  }

  rainEnded(e) {
    const $ = this.$;
    if (!this.rain || this.rain.id !== e.rain_id) return;
    this.rain.over = true;
    $("rain-tap").disabled = true;
    $("rain-info").textContent = `The rain is over: ${e.granted} packets, ${cents(e.granted_cents)} handed out.`;
    $("rain-won").textContent = `You got ${cents(this.rain.won)} in ${this.rain.packets} packet(s).`;
  }
}
