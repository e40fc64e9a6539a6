"""Exit statuses shared by every ``medge`` subcommand (documented in docs/cli.md)."""

EXIT_OK = 0
EXIT_FAILURE = 1
"""The command ran and the operation failed (device error, job failed, check failed)."""
EXIT_USAGE = 2
"""Bad command line or bad configuration: nothing was started."""
EXIT_UNAVAILABLE = 3
"""A peer needed for the command is unreachable (broker, daemon, PACS)."""
EXIT_TIMEOUT = 4
"""The command waited as long as it was allowed to and gave up."""
