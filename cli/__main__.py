from surge.main import main

main()
