from ssl_lightning.cli import main

main()
