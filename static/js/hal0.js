// The only page script: close the swap dialog, dismiss a message, keep "3 min ago" current,
// and say when the live connection drops (the server says when it is back). Everything else
// is htmx.
(function () {
  "use strict";
  function closeModal() {
    var modal = document.getElementById("modal");
    if (modal) modal.innerHTML = "";
  }
  document.addEventListener("click", function (event) {
    var target = event.target;
    if (target.closest("[data-dismiss]")) {
      var flash = target.closest(".flash");
      if (flash) flash.remove();
      return;
    }
    var closer = target.closest("[data-close-modal]");
    // a click inside the dialog is not a click on its backdrop
    if (closer && (closer.tagName === "BUTTON" || !target.closest(".modal"))) closeModal();
  });
  document.addEventListener("keydown", function (event) {
    if (event.key === "Escape") closeModal();
  });
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
  setInterval(refreshAges, 15000);
  document.addEventListener("htmx:wsClose", function () {
    var status = document.getElementById("live-status");
    if (status) {
      status.className = "live off";
      status.textContent = "reconnecting";
    }
  });
})();
