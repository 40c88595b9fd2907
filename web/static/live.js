// Live updates from /events (server-sent events): a device row or an operation row changes in
// place; nothing else on the page is rendered again.
(function () {
  "use strict";
  var page = document.getElementById("device");
  // A device's page also gets that device's telemetry and log lines.
  var source = new EventSource("/events" + (page ? "?device=" + encodeURIComponent(page.dataset.device) : ""));
  // Reads the page again and swaps in the parts that are not updated row by row (a device's
  // packages and units; a rollout's waves, devices and controls), at most every 300 ms.
  var refreshing = false;
  var again = false;
  var parts = ["packages", "units", "phase", "rollout-state", "waves", "rollout-devices", "suites", "rollouts"];
  function refreshTables() {
    // A change during a read may not be in what it reads: read once more after it.
    if (refreshing) { again = true; return; }
    refreshing = true;
    setTimeout(function () {
      fetch(location.href, { credentials: "same-origin" }).then(function (r) { return r.text(); }).then(function (html) {
        refreshing = false;
        if (again) { again = false; refreshTables(); }
        var doc = new DOMParser().parseFromString(html, "text/html");
        parts.forEach(function (id) {
          var fresh = doc.getElementById(id);
          var old = document.getElementById(id);
          if (fresh && old && fresh.innerHTML !== old.innerHTML) old.replaceWith(fresh);
        });
      }, function () {
        refreshing = false;
        if (again) { again = false; refreshTables(); }
      });
    }, 300);
  }
  // The fleet page's heading: devices per status, from the rows as they are now.
  function recount() {
    var counts = document.getElementById("counts");
    var table = document.getElementById("fleet");
    if (!counts || !table || table.dataset.whole !== "true") return;
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
  function setCell(row, i, text) {
    var cell = row.cells[i];
    if (cell && cell.textContent !== text) cell.textContent = text;
  }
  function setText(row, field, text) {
    var cell = row.querySelector('[data-field="' + field + '"]');
    if (cell && cell.textContent !== text) cell.textContent = text;
  }
  source.addEventListener("device", function (e) {
    var d = JSON.parse(e.data);
    var row = document.getElementById("dev-" + d.id);
    if (row) {
      // The fleet table's columns: device, status, since, agent, groups, units.
      row.className = "status-" + d.status;
      setCell(row, 1, d.status);
      setCell(row, 2, d.since);
      setCell(row, 3, d.agent_version);
      setCell(row, 4, d.groups.join(", "));
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
  // A sample: a point on each plot (the step's point moves when the sample is in the same
  // step), and the view slides so its right edge is the newest point.
  source.addEventListener("telemetry", function (e) {
    var u = JSON.parse(e.data);
    var plots = document.getElementById("plots");
    if (!plots) return;
    var start = Number(plots.dataset.start), span = Number(plots.dataset.span), step = Number(plots.dataset.step);
    var x = u.point.t - start;
    ["cpu", "memory", "disk"].forEach(function (m) {
      var v = u.point[m];
      var line = document.getElementById("plot-" + m);
      if (v === null || v === undefined || !line) return;
      var pts = line.getAttribute("points").trim().split(/\s+/).filter(Boolean);
      var last = pts.length ? Number(pts[pts.length - 1].split(",")[0]) : -Infinity;
      var here = x + "," + (100 - Math.max(0, Math.min(100, v))).toFixed(1);
      if (Math.floor((last + start) / step) === Math.floor(u.point.t / step)) pts[pts.length - 1] = here;
      else pts.push(here);
      line.setAttribute("points", pts.join(" "));
      var svg = line.ownerSVGElement;
      var left = Math.max(0, x - span);
      if (x > span) svg.setAttribute("viewBox", left + " 0 " + span + " 100");
      var dot = document.getElementById("dot-" + m);
      dot.hidden = false;
      dot.style.left = ((x - left) * 100 / span).toFixed(2) + "%";
      dot.style.top = (100 - Math.max(0, Math.min(100, v))).toFixed(1) + "%";
      document.getElementById("last-" + m).textContent = Math.round(v) + " %";
    });
  });
  source.addEventListener("logs", function (e) {
    var u = JSON.parse(e.data);
    var table = document.getElementById("logs");
    if (!table) return;
    var body = table.tBodies[0];
    var none = body.querySelector("tr.none");
    if (none) none.remove();
    u.lines.forEach(function (l) {
      var row = document.createElement("tr");
      row.className = "level-" + l.level;
      [l.ts, l.level, l.target, l.msg].forEach(function (text) {
        var td = document.createElement("td");
        td.textContent = text;
        row.appendChild(td);
      });
      body.insertBefore(row, body.firstChild);
    });
    var keep = Number(table.dataset.keep) || 20;
    while (body.rows.length > keep) body.deleteRow(body.rows.length - 1);
  });
  source.addEventListener("rollout", function (e) {
    var u = JSON.parse(e.data);
    var row = document.getElementById("rollout-" + u.id);
    if (row) {
      row.className = "phase-" + u.phase;
      setText(row, "phase", u.phase);
    } else if (document.getElementById("rollouts")) {
      refreshTables();
    }
    var head = document.getElementById("rollout");
    if (head && head.dataset.rollout === u.id) refreshTables();
  });
  source.addEventListener("reload", function () { location.reload(); });
  // The repository page's upload: the file as the body (what `debfleet publish` sends), the
  // form's CSRF token in a header; the answer shown, the suites read again.
  var upload = document.getElementById("upload-form");
  if (upload) upload.addEventListener("submit", function (e) {
    e.preventDefault();
    var file = document.getElementById("upload-file").files[0];
    var out = document.getElementById("upload-result");
    if (!file) return;
    var suite = document.getElementById("upload-suite").value;
    out.textContent = "uploading " + file.name + "…";
    out.className = "";
    fetch("/repo/upload?suite=" + encodeURIComponent(suite) + "&name=" + encodeURIComponent(file.name), {
      method: "POST", credentials: "same-origin", body: file,
      headers: { "X-CSRF-Token": upload.dataset.csrf, "Content-Type": "application/vnd.debian.binary-package" }
    }).then(function (r) {
      return r.text().then(function (t) {
        out.textContent = t;
        out.className = r.ok ? "ok" : "error";
        if (r.ok) refreshTables();
      });
    }, function (err) { out.textContent = "the upload failed: " + err; out.className = "error"; });
  });
  // A page left for another may be kept whole to come back to (the back/forward cache), its
  // stream open: the browser has six connections to a server over HTTP/1.1, and kept pages
  // holding them left new pages waiting. The stream closes when the page is left; a page shown
  // again from that cache is read anew, since it missed the updates meanwhile.
  window.addEventListener("pagehide", function () { source.close(); });
  window.addEventListener("pageshow", function (e) { if (e.persisted) location.reload(); });
})();
