"""Who is asking: tokens, credentials from requests, and origin checks."""
