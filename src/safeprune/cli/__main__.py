from safeprune.cli import main

main()
