"""Small shared helpers: atomic file writes (utils.io), seeding (utils.seeding), entry-point plugins
and the built-in registrations (utils.plugins, torch-free: the config checks import it)."""
