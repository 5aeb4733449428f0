// The Activity page (templates/slots/activity.html): rows pushed on top of the table are
// kept to the newest KEEP, and the "No requests yet" line goes once one arrives.
(function () {
  "use strict";
  var KEEP = 200;
  document.addEventListener("htmx:oobAfterSwap", function () {
    var body = document.getElementById("activity-rows");
    if (!body) return;
    while (body.rows.length > KEEP) body.deleteRow(-1);
    var empty = document.getElementById("activity-empty");
    if (empty && body.rows.length) empty.remove();
  });
})();
