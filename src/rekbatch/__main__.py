from rekbatch.cli import main

main()
