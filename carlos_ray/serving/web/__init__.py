"""The search page of the Serve ingress: what the pages read (:mod:`.catalog`), how they are served (:mod:`.pages`).

The pages themselves are static package data in ``static/`` (plain HTML, CSS and JavaScript; no CDN, no
build step). They only read the JSON API, build every element with ``textContent`` (never ``innerHTML``
with data) and run under a strict Content-Security-Policy without inline script.
"""
