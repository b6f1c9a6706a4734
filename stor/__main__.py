from stor.cli import main

main()
