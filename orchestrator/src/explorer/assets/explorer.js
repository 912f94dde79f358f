// The saga explorer's one script, compiled into sagad and served from /assets (the pages allow
// no inline script). It does only what a server-rendered page cannot: live updates of a saga
// page, countdowns to the next attempt, and the dialogs of the actions. Without it every page
// still shows the truth as of its loading.
(function () {
  'use strict';

  function humanize(seconds) {
    if (seconds < 60) return seconds + 's';
    const minutes = Math.floor(seconds / 60);
    if (minutes < 60) return minutes + 'm ' + (seconds % 60) + 's';
    return Math.floor(minutes / 60) + 'h ' + (minutes % 60) + 'm';
  }

  function countdowns() {
    document.querySelectorAll('[data-due]').forEach(function (element) {
      const left = Math.round((Date.parse(element.dataset.due) - Date.now()) / 1000);
      element.textContent = left > 0 ? 'in ' + humanize(left) : 'due now';
    });
  }

  document.addEventListener('click', function (event) {
    const opener = event.target.closest('[data-opens]');
    if (opener) {
      const dialog = document.getElementById(opener.dataset.opens);
      if (dialog) dialog.showModal();
      return;
    }
    const closer = event.target.closest('[data-closes]');
    if (closer) {
      const dialog = closer.closest('dialog');
      if (dialog) dialog.close();
    }
  });

  // Live updates: each event appended to the saga reloads the page's live part in place. While
  // a dialog is open the reload waits, so what a person types is not swept away.
  const live = document.getElementById('live');
  if (live && live.dataset.live) {
    let busy = false;
    let again = false;
    const refresh = async function () {
      if (busy || document.querySelector('dialog[open]')) {
        again = true;
        return;
      }
      busy = true;
      try {
        const response = await fetch(window.location.pathname, { credentials: 'same-origin', cache: 'no-store' });
        if (response.ok) {
          const fresh = new DOMParser().parseFromString(await response.text(), 'text/html');
          const next = fresh.getElementById('saga-live');
          const current = document.getElementById('saga-live');
          if (next && current) {
            current.replaceWith(document.importNode(next, true));
            document.body.dataset.liveUpdates = String(Number(document.body.dataset.liveUpdates || 0) + 1);
            countdowns();
          }
        }
      } finally {
        busy = false;
        if (again) {
          again = false;
          setTimeout(refresh, 50);
        }
      }
    };
    document.addEventListener('close', function () { if (again) refresh(); }, true);
    const source = new EventSource(live.dataset.live);
    source.addEventListener('appended', refresh);
  }

  countdowns();
  setInterval(countdowns, 1000);
})();
