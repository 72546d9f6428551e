package ca

import "errors"

// Sentinel errors. Compare with errors.Is; the wrapped message says what to do.
var (
	// ErrTokenUsed: the one-time token was already used; mint a new one.
	ErrTokenUsed = errors.New("the one-time token was already used; create a new token")
	// ErrTokenExpired: the token's exp is in the past; mint a new one. The error
	// that wraps it (a *TokenTimeError) says when it expired and how to mint another.
	ErrTokenExpired = errors.New("the one-time token expired")
	// ErrTokenNotYetValid: the token's nbf or iat is ahead of the CA's clock.
	ErrTokenNotYetValid = errors.New("the one-time token is not valid yet")
	// ErrTokenInvalid: the token is malformed, its signature does not verify, or it names
	// the wrong CA.
	ErrTokenInvalid = errors.New("the one-time token is not valid for this certificate authority")
	// ErrRevoked: the certificate was revoked; the holder needs a new token.
	ErrRevoked = errors.New("the certificate has been revoked; enroll again with a new token")
	// ErrExpired: the certificate has expired and cannot be renewed; enroll again.
	ErrExpired = errors.New("the certificate has expired; enroll again with a new token")
	// ErrWrongRole: the identity's role is not the one required here.
	ErrWrongRole = errors.New("the identity has the wrong role for this use")
	// ErrUnknownCA: the peer does not chain to this CA, or the server's root does not
	// match the pinned fingerprint.
	ErrUnknownCA = errors.New("the certificate was not issued by this certificate authority")
	// ErrNoIdentity: the certificate carries no (or more than one) Wicket SPIFFE ID.
	ErrNoIdentity = errors.New("the certificate carries no valid Wicket identity")
	// ErrInvalidName: an agent/user/gateway name does not match the allowed pattern.
	ErrInvalidName = errors.New("invalid name")
	// ErrRequestRefused: the CA refused the certificate request (e.g. a CSR asking for
	// names the token does not authorize).
	ErrRequestRefused = errors.New("the certificate authority refused the request")
	// ErrWrongPassword: the CA password does not decrypt the CA keys.
	ErrWrongPassword = errors.New("the CA password does not decrypt the CA keys; check WICKET_CA_PASSWORD or the password file")
	// ErrCorruptState: a file of the CA state is missing or unreadable; nothing was overwritten.
	ErrCorruptState = errors.New("the CA data directory is incomplete or corrupt; restore it from a backup (nothing was overwritten)")
)
