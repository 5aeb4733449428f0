// The only page script (the CSP allows no inline script): dialogs, toasts, confirmations,
// focus kept across live re-renders, "3 min ago" and elapsed time kept current, and a banner
// when hal0 itself cannot be reached. Everything else is htmx.
(function () {
  "use strict";

  // --- toasts: success and failure messages, announced by the #toasts live region ----------
  var TOAST_MS = 8000; // errors stay until dismissed
  function toast(level, text) {
    var region = document.getElementById("toasts");
    if (!region || !text) return;
    var item = document.createElement("p");
    item.className = "toast " + (level || "info");
    if (level === "error") item.setAttribute("role", "alert");
    var span = document.createElement("span");
    span.textContent = text;
    var close = document.createElement("button");
    close.type = "button";
    close.className = "link dismiss";
    close.setAttribute("data-dismiss", "");
    close.setAttribute("aria-label", "Dismiss message");
    close.textContent = "\u00d7";
    item.appendChild(span);
    item.appendChild(document.createTextNode(" "));
    item.appendChild(close);
    region.appendChild(item);
    if (level !== "error") autoDismiss(item);
  }
  function autoDismiss(item) {
    setTimeout(function () {
      // not while the reader is on it
      if (item.contains(document.activeElement) || item.matches(":hover")) autoDismiss(item);
      else item.remove();
    }, TOAST_MS);
  }
  // hx-trigger "hal0:toast" from an htmx answer: {"level": "success", "message": "…"}
  document.addEventListener("hal0:toast", function (event) {
    var detail = event.detail || {};
    toast(detail.level, detail.message);
  });

  // --- dialogs: the swap picker (loaded into #modal) and the confirmation ------------------
  var openers = new WeakMap(); // dialog -> id of the control that opened it
  function opener() {
    var active = document.activeElement;
    return active && active.id ? active.id : null;
  }
  function openDialog(dialog, from) {
    if (!dialog || dialog.open) return;
    openers.set(dialog, from || opener());
    dialog.showModal(); // the rest of the page goes inert; focus moves in (autofocus)
  }
  function giveFocusBack(dialog) {
    var id = openers.get(dialog);
    var target = id && document.getElementById(id);
    if (target) target.focus();
  }
  function closeModal() {
    var dialog = document.querySelector("#modal dialog[open]");
    if (dialog) dialog.close();
  }
  // "close" does not bubble: listen while it goes down
  document.addEventListener("close", function (event) {
    var dialog = event.target;
    if (!(dialog instanceof HTMLDialogElement)) return;
    if (dialog.closest("#modal")) {
      giveFocusBack(dialog);
      document.getElementById("modal").innerHTML = "";
    } else if (dialog.id === "confirm") {
      giveFocusBack(dialog);
      var then = pending;
      pending = null;
      if (then && dialog.returnValue === "ok") then();
    }
  }, true);
  document.addEventListener("htmx:afterSwap", function (event) {
    var target = event.detail && event.detail.target;
    if (target && target.id === "modal") {
      var source = event.detail.requestConfig && event.detail.requestConfig.elt;
      openDialog(target.querySelector("dialog"), source && source.id);
    }
  });
  // a dialog sent out of band into #modal (the fit check's confirm step) opens the same way
  document.addEventListener("htmx:oobAfterSwap", function (event) {
    var target = event.detail && event.detail.target;
    if (target && target.id === "modal") openDialog(target.querySelector("dialog"));
  });
  document.addEventListener("hal0:closeModal", closeModal);
  // the Model field's picker: "Use this" fills the field (focus goes back to Browse…)
  document.addEventListener("click", function (event) {
    var pick = event.target.closest && event.target.closest("[data-pick-model]");
    if (!pick) return;
    var field = document.getElementById("id_model_name");
    if (field) {
      field.value = pick.getAttribute("data-pick-model");
      field.dispatchEvent(new Event("change", {bubbles: true}));
    }
    closeModal();
  });
  // "Download & load" in that picker: the slot will serve the model, so the field says so
  // too (a Save afterwards must not put the old model back). On beforeRequest: only once
  // a big download's confirmation was answered yes; the dialog stays open for the progress.
  document.addEventListener("htmx:beforeRequest", function (event) {
    var elt = event.detail && event.detail.elt;
    var model = elt && elt.getAttribute && elt.getAttribute("data-fill-model");
    var field = model && document.getElementById("id_model_name");
    if (field) {
      field.value = model;
      field.dispatchEvent(new Event("change", {bubbles: true}));
    }
  });
  // Keep Tab inside an open modal dialog (showModal makes the page inert, but Tab would
  // still leave for the browser's own controls).
  var FOCUSABLE = "a[href], button:not([disabled]), input:not([disabled]):not([type=hidden])," +
    " select:not([disabled]), textarea:not([disabled]), [tabindex]:not([tabindex='-1'])";
  document.addEventListener("keydown", function (event) {
    if (event.key !== "Tab") return;
    var dialog = document.querySelector("dialog[open]");
    if (!dialog) return;
    var items = Array.prototype.filter.call(dialog.querySelectorAll(FOCUSABLE), function (el) {
      return el.offsetParent !== null || el === document.activeElement;
    });
    if (!items.length) return;
    var first = items[0], last = items[items.length - 1];
    var inside = dialog.contains(document.activeElement);
    if (event.shiftKey && (document.activeElement === first || !inside)) {
      event.preventDefault();
      last.focus();
    } else if (!event.shiftKey && (document.activeElement === last || !inside)) {
      event.preventDefault();
      first.focus();
    }
  });

  // --- confirmations: <form data-confirm="…"> and htmx's hx-confirm ------------------------
  var pending = null;
  function ask(question, action, from) {
    var dialog = document.getElementById("confirm");
    if (!dialog) { if (window.confirm(question)) action(); return; }
    document.getElementById("confirm-text").textContent = question;
    pending = action;
    dialog.returnValue = "";
    openers.set(dialog, from || opener());
    dialog.showModal();
  }
  document.addEventListener("submit", function (event) {
    var form = event.target;
    if (!form.hasAttribute || !form.hasAttribute("data-confirm")) return;
    if (form.getAttribute("data-confirmed") === "1") return;
    event.preventDefault();
    var submitter = event.submitter;
    ask(form.getAttribute("data-confirm"), function () {
      form.setAttribute("data-confirmed", "1");
      form.requestSubmit(submitter);
    }, submitter && submitter.id);
  }, true);
  document.addEventListener("htmx:confirm", function (event) {
    if (!event.detail.question) return; // no hx-confirm: nothing to ask
    event.preventDefault();
    ask(event.detail.question, function () { event.detail.issueRequest(true); },
        event.detail.elt && event.detail.elt.id);
  });

  // --- clicks: dismiss a toast, close the swap dialog, buttons that are aria-disabled ------
  document.addEventListener("click", function (event) {
    var target = event.target;
    // Card buttons say "not now" with aria-disabled rather than disabled, so that focus can
    // stay on them across a re-render: they must not act.
    if (target.closest && target.closest("[aria-disabled='true']")) {
      event.preventDefault();
      event.stopImmediatePropagation();
      return;
    }
    if (target.closest("[data-dismiss]")) {
      var item = target.closest(".toast");
      if (item) item.remove();
      return;
    }
    if (target.closest("[data-close-modal]")) { closeModal(); return; }
    // a click on the swap dialog's backdrop (the dialog box itself has an inner wrapper)
    if (target instanceof HTMLDialogElement && target.closest("#modal")) closeModal();
  }, true);

  // --- focus across live re-renders ---------------------------------------------------------
  // A pushed card replaces the button that had focus; its twin in the new card has the same
  // id, so give focus to that one instead of letting it fall to the page's body.
  var focused = null;
  document.addEventListener("focusin", function (event) { focused = event.target; });
  function keepFocus() {
    if (!focused || focused.isConnected || !focused.id) return;
    var active = document.activeElement;
    if (active && active !== document.body) return;
    var twin = document.getElementById(focused.id);
    if (twin) twin.focus({ preventScroll: true });
  }
  ["htmx:wsAfterMessage", "htmx:afterSwap", "htmx:oobAfterSwap", "htmx:afterSettle"]
    .forEach(function (name) { document.addEventListener(name, keepFocus); });

  // --- pushes for what this page does not show ------------------------------------------------
  // Every open page hears every push (one group): the slot page hears other slots' cards and
  // the node headers, a page without the swap dialog hears download progress. htmx would log
  // each as an error (no target for the out-of-band swap): skip a message none of whose
  // fragments has a place here.
  var OOB_ID = /<[a-z]+\s+id="([^"]+)"[^>]*\shx-swap-oob=/g;
  document.addEventListener("htmx:wsBeforeMessage", function (event) {
    var message = event.detail && event.detail.message;
    if (typeof message !== "string") return;
    var ids = [], match;
    OOB_ID.lastIndex = 0;
    while ((match = OOB_ID.exec(message))) ids.push(match[1]);
    if (ids.length && ids.every(function (id) { return !document.getElementById(id); })) {
      event.preventDefault();
    }
  });

  // --- hal0 unreachable -----------------------------------------------------------------------
  function banner(text) {
    var node = document.getElementById("conn-banner");
    if (!node) return;
    if (text) { node.textContent = text; node.hidden = false; } else { node.hidden = true; node.textContent = ""; }
  }
  var outcomes = {
    "htmx:sendError": function () {
      banner("hal0 cannot be reached: the request was not sent. Check that hal0 is running, then try again.");
    },
    "htmx:responseError": function (event) {
      var xhr = event.detail.xhr;
      var status = xhr ? xhr.status : 0;
      var type = xhr ? (xhr.getResponseHeader("Content-Type") || "") : "";
      var said = type.indexOf("text/plain") === 0 && xhr.responseText ? ": " + xhr.responseText.slice(0, 200) : ".";
      banner("hal0 answered " + status + (status >= 500 ? " (a server error)" : "") + said);
    },
    "htmx:afterRequest": function (event) {
      if (event.detail.successful) banner("");
    }
  };
  // Listen on the asking element itself: a pushed card may have replaced it by the time the
  // answer (or the failure) comes, and an event on a detached element bubbles nowhere.
  document.addEventListener("htmx:beforeRequest", function (event) {
    var elt = event.detail.elt;
    if (!elt || elt.hal0Watched) return;
    elt.hal0Watched = true;
    Object.keys(outcomes).forEach(function (name) { elt.addEventListener(name, outcomes[name]); });
  });
  function liveOff(text) {
    var status = document.getElementById("live-status");
    if (status) {
      status.className = "live off";
      status.textContent = "reconnecting";
    }
    // Each failed reconnect closes again: keep what the banner already says (a failed
    // request's "cannot be reached" says more than the socket's repeat).
    var node = document.getElementById("conn-banner");
    if (node && !node.hidden && node.textContent) return;
    banner(text);
  }
  var leaving = false;
  window.addEventListener("pagehide", function () { leaving = true; });
  document.addEventListener("htmx:wsClose", function () {
    if (!leaving) liveOff("The live connection to hal0 is lost: this page is not updating. Reconnecting…");
  });
  document.addEventListener("htmx:wsOpen", function () { banner(""); });

  // --- times: "3 min ago" and the elapsed time of a load or download -----------------------
  // "3 min ago" is rendered by the server (the `ago` filter) when a card is pushed; a card
  // that nothing changes would keep saying "just now", so recount from the datetime
  // attribute, with the filter's own wording, every 15 s.
  // Count on the server's clock, not the browser's: the page says when it was rendered.
  var rendered = new Date(document.body.getAttribute("data-server-now"));
  var skew = isNaN(rendered) ? 0 : rendered.getTime() - Date.now();
  function plural(n, unit) {
    return n + "\u00a0" + unit + (n === 1 ? "" : "s") + " ago"; // timesince's wording
  }
  function ago(moment) {
    var seconds = (Date.now() + skew - moment.getTime()) / 1000;
    if (seconds < 10) return "just now";
    if (seconds < 60) return Math.floor(seconds) + " s ago";
    if (seconds < 3600) return Math.floor(seconds / 60) + " min ago";
    if (seconds < 86400) return Math.floor(seconds / 3600) + " h ago";
    var days = Math.floor(seconds / 86400);
    if (days < 7) return plural(days, "day");
    if (days < 28) return plural(Math.floor(days / 7), "week");
    return null; // months: calendar arithmetic, the server's wording stands
  }
  function refreshAges() {
    document.querySelectorAll("time[data-ago]").forEach(function (node) {
      var moment = new Date(node.getAttribute("datetime"));
      var text = isNaN(moment) ? null : ago(moment);
      if (text && node.textContent !== text) node.textContent = text;
    });
  }
  // the `elapsed` filter's wording: 0:42, 5:07, 1:02:03
  function elapsed(seconds) {
    seconds = Math.max(0, Math.floor(seconds));
    var h = Math.floor(seconds / 3600), m = Math.floor(seconds / 60) % 60, s = seconds % 60;
    var mm = h ? String(m).padStart(2, "0") : String(m);
    return (h ? h + ":" : "") + mm + ":" + String(s).padStart(2, "0");
  }
  function tickElapsed() {
    document.querySelectorAll("time[data-elapsed]").forEach(function (node) {
      var since = new Date(node.getAttribute("datetime"));
      if (isNaN(since)) return;
      var text = elapsed((Date.now() + skew - since.getTime()) / 1000);
      if (node.textContent !== text) node.textContent = text;
    });
  }
  setInterval(refreshAges, 15000);
  setInterval(tickElapsed, 1000);

  // --- on load: announce the messages a full-page post left (Django messages) --------------
  // A live region announces what is added to it, not what it held when the page loaded.
  document.addEventListener("DOMContentLoaded", function () {
    var region = document.getElementById("toasts");
    if (!region || !region.children.length) return;
    var items = Array.prototype.slice.call(region.children);
    items.forEach(function (item) { item.remove(); });
    setTimeout(function () {
      items.forEach(function (item) {
        region.appendChild(item);
        if (!item.classList.contains("error")) autoDismiss(item);
      });
    }, 150);
  });
})();
