"""The phase-gated pipeline: the registry of the nine phases with their gates (each gate a pure
function of files and settings), and the runner every phase script and tool goes through.
"""
