"""The tracking service. Delivery status, opens, clicks, bounces, complaints and reports."""
