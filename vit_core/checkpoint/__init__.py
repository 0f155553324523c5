"""vitx's checkpoint layer (numpy only): one module per container, the name rules, staging, fitting.
"""
