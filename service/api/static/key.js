// The API key, for a server that needs one (GPTSERVE_API_KEY). Asked for when the server
// answers 401, sent as "Authorization: Bearer", and kept in this tab's sessionStorage only
// (gone when the tab closes; never in localStorage or a cookie).
"use strict";

const gptKey = (() => {
  const NAME = "gptserve.apiKey";
  let memory = "";

  function get() {
    try {
      return sessionStorage.getItem(NAME) || "";
    } catch {
      return memory; // storage blocked: keep it in this page only
    }
  }

  function set(key) {
    memory = key;
    try {
      sessionStorage.setItem(NAME, key);
    } catch {
      /* memory only */
    }
  }

  function headers(extra) {
    const all = { ...(extra || {}) };
    const key = get();
    if (key) all.Authorization = "Bearer " + key;
    return all;
  }

  let pending = null;

  // A modal form; resolves with the key typed in. One at a time, however many requests wait.
  function ask(reason) {
    if (pending) return pending;
    pending = new Promise((resolve) => {
      const dialog = document.createElement("dialog");
      dialog.id = "key-dialog";
      dialog.innerHTML =
        '<form method="dialog"><h2>API key</h2><p class="reason"></p>' +
        '<label>Key <input type="password" name="key" autocomplete="off" required></label>' +
        '<p class="note">Kept in this tab only, until it closes.</p>' +
        '<button type="submit">Use key</button></form>';
      dialog.querySelector(".reason").textContent = reason;
      const input = dialog.querySelector("input");
      dialog.addEventListener("cancel", (event) => event.preventDefault());
      dialog.querySelector("form").addEventListener("submit", () => {
        set(input.value.trim());
        dialog.remove();
        pending = null;
        resolve(get());
      });
      document.body.append(dialog);
      dialog.showModal();
      input.focus();
    });
    return pending;
  }

  // fetch() with the key; on 401 asks for a (new) key and tries again.
  async function keyedFetch(url, init) {
    init = init || {};
    for (;;) {
      const response = await fetch(url, { ...init, headers: headers(init.headers) });
      if (response.status !== 401) return response;
      let message = "";
      try {
        message = (await response.json()).error.message;
      } catch {
        /* not our error body */
      }
      const reason = get()
        ? "The server refused that key (" + message + ")."
        : "This server needs an API key.";
      await ask(reason);
    }
  }

  return { get, headers, ask, fetch: keyedFetch };
})();
