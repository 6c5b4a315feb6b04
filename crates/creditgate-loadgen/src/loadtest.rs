//! `creditgate loadtest`: options, setup, the live progress line, the final table, JSON and HTML outputs, exit status.
