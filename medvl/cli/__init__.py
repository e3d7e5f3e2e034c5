"""Command-line entry points: ``medvl-infer``, ``medvl-score`` and ``medvl-gates`` (the server's
``medvl-serve`` and ``medvl-demo`` live with the HTTP layer).
"""
