// Live updates from /events (server-sent events): a device row or an operation row changes in
// place; nothing else on the page is rendered again.
(function () {
  "use strict";
  var source = new EventSource("/events");
  // Reads the device page again and swaps in its tables that the pages do not update row by
  // row (packages, units), at most once per second.
  var refreshing = null;
  function refreshTables() {
    if (refreshing) return;
    refreshing = setTimeout(function () {
      fetch(location.href, { credentials: "same-origin" }).then(function (r) { return r.text(); }).then(function (html) {
        refreshing = null;
        var doc = new DOMParser().parseFromString(html, "text/html");
        ["packages", "units"].forEach(function (id) {
          var fresh = doc.getElementById(id);
          var old = document.getElementById(id);
          if (fresh && old && fresh.innerHTML !== old.innerHTML) old.replaceWith(fresh);
        });
      }, function () { refreshing = null; });
    }, 300);
  }
  // The fleet page's heading: devices per status, from the rows as they are now.
  function recount() {
    var counts = document.getElementById("counts");
    var table = document.getElementById("fleet");
    if (!counts || !table || table.dataset.group || table.dataset.status) return;
    var by = {};
    var rows = table.tBodies[0].rows;
    for (var i = 0; i < rows.length; i++) {
      var s = rows[i].className.replace("status-", "");
      by[s] = (by[s] || 0) + 1;
    }
    counts.textContent = "";
    counts.appendChild(document.createTextNode(rows.length + " devices"));
    Object.keys(by).sort().forEach(function (s) {
      counts.appendChild(document.createTextNode(" · "));
      var span = document.createElement("span");
      span.className = "status-" + s;
      span.textContent = by[s] + " " + s;
      counts.appendChild(span);
    });
  }
  function setText(row, field, text) {
    var cell = row.querySelector('[data-field="' + field + '"]');
    if (cell && cell.textContent !== text) cell.textContent = text;
  }
  source.addEventListener("device", function (e) {
    var d = JSON.parse(e.data);
    var row = document.getElementById("dev-" + d.id);
    if (row) {
      row.className = "status-" + d.status;
      setText(row, "status", d.status);
      setText(row, "since", d.since);
      setText(row, "agent_version", d.agent_version);
      setText(row, "groups", d.groups.join(", "));
    }
    recount();
    var head = document.getElementById("device");
    var pill = document.getElementById("status");
    if (head && pill && head.dataset.device === d.id) {
      pill.className = "pill status-" + d.status;
      pill.textContent = d.status;
      refreshTables();
    }
  });
  source.addEventListener("op", function (e) {
    var u = JSON.parse(e.data);
    var head = document.getElementById("device");
    var table = document.getElementById("ops");
    if (!head || !table || head.dataset.device !== u.device) return;
    var o = u.op;
    var row = document.getElementById("op-" + o.id);
    if (!row) {
      row = document.createElement("tr");
      row.id = "op-" + o.id;
      ["id", "verb", "state", "progress", "by", "updated", "detail"].forEach(function (f) {
        var td = document.createElement("td");
        td.dataset.field = f;
        row.appendChild(td);
      });
      table.tBodies[0].insertBefore(row, table.tBodies[0].firstChild);
      setText(row, "id", o.id);
      setText(row, "verb", o.verb);
      setText(row, "by", o.by);
    }
    row.className = "op-" + o.state;
    setText(row, "state", o.state);
    setText(row, "progress", (o.phase + " " + o.percent).trim());
    setText(row, "updated", o.updated);
    setText(row, "detail", o.detail);
    if (o.state === "succeeded" || o.state === "failed") refreshTables();
  });
  source.addEventListener("reload", function () { location.reload(); });
})();
