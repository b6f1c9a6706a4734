"""The composition root: `build` names the concrete classes and builds the app, the service
and the tools' service from a config; `reload` applies a re-read config to a running worker."""
