"""The pipeline's foundation: settings and profiles, the run's folders, atomic writes, the
environment probe and summary statistics. Imports nothing else from medvl: every layer above
may use it.
"""
