//! The shipperd binary: one subcommand per service, and all of them in one process
