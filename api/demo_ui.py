"""The seed's entry point for the Gradio demo: ``python api/demo_ui.py [--help]``.

The demo lives in the installed package (:mod:`medvl.http.demo_ui`; also ``medvl-demo``); this
file only calls it.
"""

from medvl.http.demo_ui import main

if __name__ == "__main__":
    main()
