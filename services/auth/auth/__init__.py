"""The auth service. Identities: sign-up, login, MFA, sessions, API keys and administrators."""
