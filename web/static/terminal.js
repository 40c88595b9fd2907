// The terminal tab: xterm.js on the page, the remote shell's output as server-sent events,
// keystrokes and resizes as small POSTs (in order: one in flight, the rest batched).
(function () {
  const el = document.getElementById('terminal');
  const state = document.getElementById('term-state');
  const device = el.dataset.device, csrf = el.dataset.csrf;
  const term = new Terminal({ cols: 100, rows: 30, cursorBlink: true, scrollback: 5000 });
  term.open(el);
  term.focus();
  let id = null, pending = '', sending = false, ended = false;
  const show = (s) => { state.textContent = s; state.className = 'pill term-' + s.split(':')[0].replace(/ /g, '-'); };
  const post = (path, body) => fetch(path, { method: 'POST', headers: { 'x-csrf': csrf }, body, keepalive: true });
  function flush() {
    if (sending || !pending || !id || ended) return;
    const chunk = pending.slice(0, 4096);
    pending = pending.slice(chunk.length);
    sending = true;
    post('/terminal/' + id + '/input', new TextEncoder().encode(chunk)).finally(() => { sending = false; flush(); });
  }
  term.onData((d) => { pending += d; flush(); });
  term.onResize((s) => { if (id && !ended) post('/terminal/' + id + '/resize?cols=' + s.cols + '&rows=' + s.rows); });
  const form = new URLSearchParams({ csrf, cols: term.cols, rows: term.rows });
  fetch('/device/' + encodeURIComponent(device) + '/terminal', { method: 'POST', body: form })
    .then((r) => r.json())
    .then((j) => {
      if (j.error) { show('refused'); term.write('\r\n[' + j.error + ']\r\n'); return; }
      id = j.id;
      show('open');
      const es = new EventSource('/terminal/' + id + '/events');
      es.addEventListener('data', (e) => {
        const raw = atob(e.data);
        const bytes = new Uint8Array(raw.length);
        for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
        term.write(bytes);
      });
      es.addEventListener('end', (e) => {
        ended = true;
        es.close();
        show('ended');
        term.write('\r\n[' + e.data + ']\r\n');
      });
      flush();
    })
    .catch((e) => { show('refused'); term.write('\r\n[' + e + ']\r\n'); });
  window.addEventListener('pagehide', () => { if (id && !ended) post('/terminal/' + id + '/close'); });
  window.debfleetTerminal = term;
})();
