"""The channel engine: intake, filters, steps, ordered lanes, deliveries with retries."""
