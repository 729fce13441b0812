"""The api service: users, tokens, videos' metadata, comments, danmaku and the live channel."""
