"""Optional integrations with the frameworks producers and logins live in."""
