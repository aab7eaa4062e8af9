// Live updates for a dashboard page whose <main> names a long-poll URL (data-live-url) and what the page shows
// (data-fingerprint). The registry answers once that has changed; the page is then fetched again and its new
// <main> put in place, rendered and escaped by the server like the first. No timer reloads anything: each
// request waits on the registry. Without JavaScript the page is complete, only not live.
"use strict";

(function () {
  var RETRY_MS = 5000; // after a failed request, before asking again

  function current() {
    return document.getElementById("content");
  }

  function openDetails(main) {
    return Array.prototype.map.call(main.querySelectorAll("details[open][id]"), function (d) { return d.id; });
  }

  function refreshPage() {
    return fetch(window.location.href, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (response) {
        if (!response.ok) { throw new Error("page answered " + response.status); }
        return response.text();
      })
      .then(function (html) {
        var fresh = new DOMParser().parseFromString(html, "text/html");
        var main = current(), newMain = fresh.getElementById("content");
        if (!newMain || !newMain.dataset.liveUrl) { window.location.reload(); return; } // logged out meanwhile
        var opened = openDetails(main);
        main.replaceWith(document.importNode(newMain, true));
        opened.forEach(function (id) {
          var details = document.getElementById(id);
          if (details) { details.open = true; }
        });
        document.title = fresh.title;
      });
  }

  function poll() {
    var main = current();
    var url = main.dataset.liveUrl;
    var separator = url.indexOf("?") < 0 ? "?" : "&";
    fetch(url + separator + "since=" + encodeURIComponent(main.dataset.fingerprint),
          { credentials: "same-origin", headers: { "Accept": "application/json" } })
      .then(function (response) {
        if (response.status === 401) { window.location.reload(); throw new Error("logged out"); }
        if (!response.ok) { throw new Error("live update answered " + response.status); }
        return response.json();
      })
      .then(function (answer) {
        return answer.fingerprint === current().dataset.fingerprint ? null : refreshPage();
      })
      .then(poll, function () { window.setTimeout(poll, RETRY_MS); });
  }

  if (current() && current().dataset.liveUrl) { poll(); }
})();
