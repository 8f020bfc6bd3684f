"""The commands of ``cifarlab``, one module each, on top of the modules that do the work; ``cifarlab.cli`` dispatches
to them. ``fit`` holds LightningCLI (fit, validate, test), ``recipe`` the recipe-based commands' parser (stats,
lr-find, audit), ``parsing`` the parsers' shared pieces."""
