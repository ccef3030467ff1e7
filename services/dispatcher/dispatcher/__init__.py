"""The dispatcher service. Renders, signs and delivers each recipient's message over SMTP."""
