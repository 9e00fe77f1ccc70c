"""One module per `visalign` sub-command: add_parser(subparsers) and run(args) -> exit code."""
