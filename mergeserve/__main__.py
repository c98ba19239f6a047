from mergeserve.cli import main

main()
