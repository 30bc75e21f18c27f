"""``ssl-lightning audit``: data problems found before training (ssl_lightning.audit.command)."""
