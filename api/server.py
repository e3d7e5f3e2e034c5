"""The seed's entry point for the HTTP API: ``python api/server.py [--help]``.

The server lives in the installed package (:mod:`medvl.http.server`; also ``medvl-serve`` and
``python -m medvl.http.server``); this file only calls it, so the seed's command keeps working.
"""

from medvl.http.server import main

if __name__ == "__main__":
    main()
