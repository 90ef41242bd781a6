// The playground: chat against /v1/chat/completions, raw text against /generate, both
// streamed; per reply the figures of a serving engine; the server's load from /metrics.
// Plain browser JavaScript, no build step. URLs are relative, so a path prefix works.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const state = {
    mode: "chat",
    history: [], // chat messages sent so far: {role, content}
    controller: null, // the AbortController of the request in flight
    info: null,
  };

  // -- header: the served model, from /info -------------------------------------------------

  const infoReady = (async () => {
    try {
      const response = await gptKey.fetch("info");
      if (!response.ok) throw new Error(await errorText(response));
      const info = await response.json();
      state.info = info;
      $("info-model").textContent = info.model;
      $("info-context").textContent = info.max_model_len.toLocaleString("en") + " tokens";
      $("info-dtype").textContent = info.dtype;
      $("info-device").textContent = info.device;
      $("info-version").textContent = info.version;
      showMaxTokensDefault();
    } catch (error) {
      banner("Could not read /info: " + error.message);
    }
  })();

  function showMaxTokensDefault() {
    if (!state.info) return; // the page's text until /info answers
    const limits = state.info.limits || {};
    const text =
      state.mode === "chat"
        ? "default: the rest of the context, at most " + (limits.max_tokens ?? "?")
        : "default " + (limits.default_max_tokens ?? "?");
    $("max-tokens-default").textContent = text;
  }

  function banner(text) {
    let element = $("banner");
    if (!element) {
      element = document.createElement("div");
      element.id = "banner";
      element.setAttribute("role", "alert");
      document.body.insertBefore(element, document.querySelector("main"));
    }
    element.textContent = text;
  }

  // -- live panel: running and waiting requests, KV cache usage, from /metrics --------------

  const GAUGES = {
    gptserve_requests_running: "running",
    gptserve_requests_waiting: "waiting",
    gptserve_kv_cache_usage_ratio: "kv",
  };

  function parseMetrics(text) {
    const values = {};
    for (const line of text.split("\n")) {
      const match = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{[^}]*\})?\s+(\S+)/.exec(line);
      if (match && match[1] in GAUGES) {
        const name = GAUGES[match[1]];
        values[name] = (values[name] || 0) + Number(match[2]);
      }
    }
    return values;
  }

  async function pollMetrics() {
    if (!document.hidden) {
      try {
        const response = await fetch("metrics");
        if (response.ok) {
          const values = parseMetrics(await response.text());
          $("live-running").textContent = values.running ?? "–";
          $("live-waiting").textContent = values.waiting ?? "–";
          if (values.kv !== undefined) {
            $("live-kv").textContent = (100 * values.kv).toFixed(1) + " %";
            $("live-kv-meter").value = values.kv;
          }
        }
      } catch {
        // the server is gone or restarting: keep the last figures
      }
    }
    setTimeout(pollMetrics, 1000);
  }
  pollMetrics();

  // -- settings ------------------------------------------------------------------------------

  function numberField(body, id, integer) {
    const raw = $(id).value.trim();
    if (raw === "") return;
    body[id] = integer ? parseInt(raw, 10) : Number(raw);
  }

  function sampling() {
    const body = {};
    numberField(body, "temperature", false);
    numberField(body, "top_p", false);
    numberField(body, "top_k", true);
    numberField(body, "max_tokens", true);
    numberField(body, "seed", true);
    const stop = $("stop_strings")
      .value.split("\n")
      .filter((line) => line !== "");
    if (stop.length) body.stop = stop;
    if ($("ignore_eos").checked) body.ignore_eos = true;
    return body;
  }

  // The JSON-schema box as an OpenAI response_format, or null when empty. A bare schema is
  // wrapped; {"name", "schema", ...} is taken as the whole json_schema object.
  function responseFormat() {
    const raw = $("json_schema").value.trim();
    if (!raw) return null;
    let value;
    try {
      value = JSON.parse(raw);
    } catch (error) {
      throw new Error("The JSON schema is not valid JSON: " + error.message);
    }
    const whole = value && typeof value === "object" && "schema" in value && "name" in value;
    return {
      type: "json_schema",
      json_schema: whole ? value : { name: "playground", schema: value },
    };
  }

  $("reset").addEventListener("click", () => {
    for (const element of $("settings").querySelectorAll("[data-default]")) {
      if (element.type === "checkbox") element.checked = element.dataset.default === "true";
      else element.value = element.dataset.default;
    }
  });

  // -- modes ---------------------------------------------------------------------------------

  function setMode(mode) {
    state.mode = mode;
    $("mode-chat").setAttribute("aria-selected", String(mode === "chat"));
    $("mode-raw").setAttribute("aria-selected", String(mode === "raw"));
    $("chat-log").hidden = mode !== "chat";
    $("raw-log").hidden = mode !== "raw";
    for (const element of document.querySelectorAll(".chat-only")) {
      element.setAttribute("aria-disabled", String(mode !== "chat"));
      for (const input of element.querySelectorAll("textarea, input")) input.disabled = mode !== "chat";
    }
    $("prompt").placeholder =
      mode === "chat"
        ? "Type a message. Enter sends, Shift+Enter adds a line."
        : "Text to continue (POST /generate). Enter sends, Shift+Enter adds a line.";
    showMaxTokensDefault();
    $("prompt").focus();
  }
  $("mode-chat").addEventListener("click", () => setMode("chat"));
  $("mode-raw").addEventListener("click", () => setMode("raw"));
  $("clear").addEventListener("click", () => {
    if (state.controller) return;
    if (state.mode === "chat") state.history = [];
    $(state.mode === "chat" ? "chat-log" : "raw-log").replaceChildren();
  });

  // -- the conversation ----------------------------------------------------------------------

  function addMessage(role, text) {
    const log = $(state.mode === "chat" ? "chat-log" : "raw-log");
    const message = document.createElement("div");
    message.className = "message " + role + (state.mode === "raw" ? " raw" : "");
    const label = document.createElement("div");
    label.className = "role";
    label.textContent = role;
    const body = document.createElement("div");
    body.className = "text";
    body.textContent = text;
    message.append(label, body);
    log.append(message);
    log.scrollTop = log.scrollHeight;
    return message;
  }

  function showStats(message, figures) {
    const stats = document.createElement("div");
    stats.className = "stats";
    for (const [name, value, key] of figures) {
      const item = document.createElement("span");
      item.dataset.stat = key;
      item.append(name + " ");
      const bold = document.createElement("b");
      bold.textContent = value;
      item.append(bold);
      stats.append(item);
    }
    message.append(stats);
  }

  function showError(message, text) {
    const error = document.createElement("div");
    error.className = "error";
    error.setAttribute("role", "alert");
    error.textContent = text;
    message.append(error);
  }

  async function errorText(response) {
    let detail = response.statusText;
    try {
      detail = describeError((await response.json()).error);
    } catch {
      /* not a JSON error body */
    }
    return "HTTP " + response.status + ": " + detail;
  }

  function describeError(error) {
    if (!error) return "unknown error";
    return error.message + (error.param ? " (" + error.param + ")" : "");
  }

  // The data: payloads of a Server-Sent Events body, until [DONE].
  async function* sseEvents(body) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of block.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") return;
          yield JSON.parse(data);
        }
      }
    }
  }

  function setBusy(busy) {
    $("send").disabled = busy;
    $("stop").disabled = !busy;
    $("clear").disabled = busy;
  }

  async function send() {
    const text = $("prompt").value;
    if (state.controller || !text.trim()) return;
    await infoReady;
    const chat = state.mode === "chat";
    let url, body;
    const sent = addMessage(chat ? "user" : "prompt", text);
    const reply = addMessage(chat ? "assistant" : "completion", "");
    try {
      if (chat) {
        const system = $("system").value.trim();
        const messages = [...state.history, { role: "user", content: text }];
        if (system) messages.unshift({ role: "system", content: system });
        body = {
          model: state.info ? state.info.model : "",
          messages,
          stream: true,
          stream_options: { include_usage: true },
          ...sampling(),
        };
        const format = responseFormat();
        if (format) body.response_format = format;
        url = "v1/chat/completions";
      } else {
        body = { prompt: text, stream: true, ...sampling() };
        url = "generate";
      }
    } catch (error) {
      sent.classList.add("failed");
      reply.querySelector(".text").remove();
      showError(reply, error.message);
      reply.dataset.done = "error";
      return;
    }
    $("prompt").value = "";
    const controller = new AbortController();
    state.controller = controller;
    setBusy(true);

    const start = performance.now();
    let first = null;
    let last = null;
    let chunks = 0;
    let usage = null;
    let finish = null;
    let output = "";
    let failure = null;
    const shown = reply.querySelector(".text");
    try {
      const response = await gptKey.fetch(url, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
        signal: controller.signal,
      });
      if (!response.ok) throw new Error(await errorText(response));
      for await (const event of sseEvents(response.body)) {
        if (event.error) throw new Error(describeError(event.error));
        if (event.usage) usage = event.usage;
        let delta = "";
        if (chat) {
          for (const choice of event.choices || []) {
            delta += (choice.delta && choice.delta.content) || "";
            finish = choice.finish_reason || finish;
          }
        } else {
          delta = event.text || "";
          finish = event.finish_reason || finish;
        }
        if (delta) {
          const now = performance.now();
          if (first === null) first = now;
          last = now;
          chunks += 1;
          output += delta;
          shown.textContent = output;
          shown.parentElement.parentElement.scrollTop = shown.parentElement.parentElement.scrollHeight;
        }
      }
    } catch (error) {
      if (error.name === "AbortError") finish = "stopped";
      else failure = error.message;
    } finally {
      state.controller = null;
      setBusy(false);
    }

    if (failure) {
      sent.classList.add("failed");
      if (!output) shown.remove();
      showError(reply, failure);
    } else if (chat) {
      state.history.push({ role: "user", content: text });
      state.history.push({ role: "assistant", content: output });
    }
    reply.dataset.done = failure ? "error" : "ok";
    if (failure && first === null) {
      $("prompt").focus();
      return; // nothing streamed: no figures to show
    }
    const out = usage ? usage.completion_tokens : chunks;
    const decodeSeconds = first !== null && last > first ? (last - first) / 1000 : 0;
    showStats(reply, [
      ["TTFT", first === null ? "–" : Math.round(first - start) + " ms", "ttft"],
      ["tokens/s", out > 1 && decodeSeconds > 0 ? ((out - 1) / decodeSeconds).toFixed(1) : "–", "tps"],
      ["in", usage ? String(usage.prompt_tokens) : "–", "in"],
      ["out", usage ? String(out) : "≈" + out, "out"],
      ["finish", finish || (failure ? "error" : "–"), "finish"],
    ]);
    $("prompt").focus();
  }

  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  $("stop").addEventListener("click", () => {
    if (state.controller) state.controller.abort();
  });

  setMode("chat");
})();
